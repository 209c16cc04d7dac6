"""distlm.data.loading.loader.ShardLoader on real shards of uneven sizes whose samples say who they are; object
storage is fsspec's in-memory file system, with a log of the range requests it serves."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from distributed import run_ranks
from fsspec.implementations.memory import MemoryFileSystem

from distlm.config import compose_config
from distlm.data.loading.loader import ShardLoader
from distlm.data.shards import Manifest, ShardError, SplitInfo, TokenizerInfo, shard_name, write_shard
from distlm.validation import validate_train

SHARD_SIZES = [7, 13, 5, 11, 9]   # 45 samples, uneven shards
SAMPLE_LEN = 4
DATA = compose_config().data   # the loader keys' defaults from conf/; tests replace a few


class LoggedStorage(MemoryFileSystem):
    """Object storage in memory (`logged://`): counts the bytes it serves, can be slow, and logs every batch of
    range requests (process, file, requests) to `log_file` when set (DataLoader workers write there too)."""
    protocol = ("logged",)
    served = 0
    delay = 0.0
    log_file: Path | None = None

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("logged://"))

    def cat_ranges(self, paths, starts, ends, **kwargs):
        time.sleep(type(self).delay)
        if type(self).log_file:
            with open(type(self).log_file, "a") as log:
                log.write(f"{os.getpid()} {Path(paths[0]).name} {len(paths)}\n")
        return super().cat_ranges(paths, starts, ends, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end, **kwargs)
        type(self).served += len(data)
        return data


fsspec.register_implementation("logged", LoggedStorage, clobber=True)


def upload(data_dir: Path, name: str) -> str:
    """A copy of a local data directory on the logged storage; its URL."""
    storage = LoggedStorage()
    for path in data_dir.iterdir():
        storage.pipe(f"/{name}/{path.name}", path.read_bytes())
    return f"logged://{name}"


def write_numbered_shards(root: Path, boundaries: bool = False, sizes=SHARD_SIZES, sample_len=SAMPLE_LEN) -> Path:
    """Shards whose sample number n holds the tokens [n, n, ...] (and a document starting at n % sample_len),
    and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards, first = [], 0
    for index, size in enumerate(sizes):
        numbers = np.arange(first, first + size, dtype=np.uint16)
        samples = np.repeat(numbers[:, None], sample_len, axis=1)
        starts = None
        if boundaries:
            starts = np.zeros((size, sample_len), dtype=bool)
            starts[np.arange(size), numbers % sample_len] = True
            starts[:, 0] |= numbers % 2 == 0   # and even samples begin with a document
        shards.append(write_shard(root / shard_name("train", index), samples, starts))
        first += size
    split = SplitInfo(samples=first, tokens=first * sample_len, shards=shards)
    Manifest(fingerprint="numbered-test-shards", seq_len=sample_len - 1, sample_len=sample_len, dtype="uint16",
             tokenizer=TokenizerInfo(file="tokenizer.json", sha256="", vocab_size=1000, eos_id=0),
             splits={"train": split, "val": split}, stats={}, inputs=[], config={},
             doc_boundaries=boundaries).save(root)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_numbered_shards(tmp_path_factory.mktemp("numbered"))


def loader(data_dir, dp_size=1, micro=1, rank=0, seed=1, split="train", shuffle=True, window=6, workers=0,
           shard_url=None, verify=True, **kw) -> ShardLoader:
    data = dataclasses.replace(DATA, dir=str(data_dir), shuffle_window=window, loader_workers=workers,
                               shard_url=shard_url, verify_shards=verify)
    return ShardLoader(data, split, micro, rank, dp_size, seed=seed, shuffle=shuffle, **kw)


def sample_ids(batches) -> list[list[int]]:
    """Each batch as the list of its sample numbers."""
    return [batch[:, 0].tolist() for batch in batches]


def run(data_dir, dp_size=1, micro=1, rank=0, max_batches=None, start=0, **kw) -> list[list[int]]:
    return sample_ids(loader(data_dir, dp_size, micro, rank, **kw).iter_batches(start, max_batches=max_batches))


def global_batches(data_dir, dp_size, micro, steps, start=0, **kw) -> list[list[int]]:
    """Step k's samples over all ranks (rank 0's batch, then rank 1's, ...)."""
    per_rank = [run(data_dir, dp_size, micro, rank=r, max_batches=steps, start=start, **kw) for r in range(dp_size)]
    return [sum((per_rank[r][k] for r in range(dp_size)), []) for k in range(steps)]


# ---------------------------------------------------------------- order, layouts, resume

def test_ranks_get_disjoint_equal_shares_from_uneven_shards(data_dir):
    dp, micro = 3, 2
    per_rank = [run(data_dir, dp, micro, rank=r, max_batches=7, seed=7) for r in range(dp)]
    assert loader(data_dir, dp, micro).batches_per_epoch == 45 // (dp * micro)
    assert all(len(batches) == 7 and all(len(b) == micro for b in batches) for batches in per_rank)
    samples = [{n for batch in batches for n in batch} for batches in per_rank]
    assert sum(len(s) for s in samples) == len(set.union(*samples)) == 42   # disjoint
    # Every rank keeps getting batches in step, across the epoch boundary (45 is no multiple of 6).
    assert all(len(run(data_dir, dp, micro, rank=r, max_batches=30, seed=7)) == 30 for r in range(dp))


def test_a_step_sees_the_same_samples_whatever_the_layout(data_dir):
    one_rank = global_batches(data_dir, 1, 12, steps=8)
    assert global_batches(data_dir, 2, 6, steps=8) == one_rank
    assert global_batches(data_dir, 3, 4, steps=8) == one_rank
    assert global_batches(data_dir, 4, 3, steps=8, workers=2) == one_rank


def test_batches_are_long_tensors_of_whole_samples(data_dir):
    batch = next(loader(data_dir, micro=5).iter_batches())
    assert str(batch.dtype) == "torch.int64" and tuple(batch.shape) == (5, SAMPLE_LEN)
    assert (batch == batch[:, :1]).all()
    assert list(loader(data_dir, micro=5).iter_batches(max_batches=0)) == []


def test_order_is_a_function_of_the_seed(data_dir):
    assert run(data_dir, 2, 3, max_batches=10, seed=5) == run(data_dir, 2, 3, max_batches=10, seed=5)
    assert run(data_dir, 2, 3, max_batches=10, seed=5) != run(data_dir, 2, 3, max_batches=10, seed=6)


def test_each_epoch_shuffles_shards_and_windows_anew(data_dir):
    epochs = run(data_dir, 1, 5, max_batches=18)   # 9 batches per epoch
    first, second = sum(epochs[:9], []), sum(epochs[9:], [])
    assert sorted(first) == sorted(second) == list(range(45))
    assert first != second and first != list(range(45))
    # Windows of >= 20 samples span several shards and interleave them: shards read in turn would change
    # shard only 4 times in an epoch.
    shard_of = np.searchsorted(np.cumsum(SHARD_SIZES), sum(run(data_dir, 1, 5, max_batches=9, window=20), []),
                               side="right")
    assert np.count_nonzero(np.diff(shard_of)) > 10


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_batches_of_an_uninterrupted_run(data_dir, workers):
    dp, micro = 2, 3   # 7.5 batches per epoch on each rank; windows of >= 4 samples cut across batches
    for rank in range(dp):
        uninterrupted = run(data_dir, dp, micro, rank=rank, max_batches=25, window=4, workers=workers)
        for done in (1, 6, 7, 8, 20):
            resumed = run(data_dir, dp, micro, rank=rank, start=done * dp * micro, max_batches=5, window=4,
                          workers=workers)
            assert resumed == uninterrupted[done: done + 5], f"rank {rank} resumed after {done} batches"


def test_resume_with_another_layout_continues_the_same_stream(data_dir):
    uninterrupted = sum(global_batches(data_dir, 1, 6, steps=15), [])       # 90 samples: two epochs
    before = sum(global_batches(data_dir, 2, 3, steps=4), [])               # 24 samples on 2 ranks
    middle = sum(global_batches(data_dir, 3, 1, steps=7, start=24), [])     # 21 more on 3 ranks
    after = sum(global_batches(data_dir, 1, 5, steps=9, start=45), [])      # 45 more on 1 rank
    assert before + middle + after == uninterrupted
    assert sorted(before + middle) == list(range(45)), "epoch 0: each sample exactly once"


def test_start_sample_must_be_a_whole_number_of_global_batches(data_dir):
    with pytest.raises(ValueError, match="multiple"):
        loader(data_dir, 2, 3).iter_batches(start_sample=4)


def test_a_non_train_split_makes_one_pass_in_file_order_without_shuffle(data_dir):
    assert run(data_dir, 1, 5, split="val", shuffle=False) == [list(range(i, i + 5)) for i in range(0, 45, 5)]
    # Two ranks, batches of 4: 5 steps of 8 samples, the last 5 samples left out; the same count on both.
    assert run(data_dir, 2, 4, rank=1, split="val", shuffle=False) == [list(range(i + 4, i + 8)) for i in range(0, 40, 8)]
    assert len(run(data_dir, 2, 4, rank=0, split="val", shuffle=False)) == 5


# ---------------------------------------------------------------- storage

def test_shards_read_the_same_from_local_paths_file_urls_and_object_storage(data_dir):
    expected = run(data_dir, 2, 3, rank=1, max_batches=9)
    assert run(upload(data_dir, "same"), 2, 3, rank=1, max_batches=9) == expected
    assert run(f"file://{data_dir}", 2, 3, rank=1, max_batches=9) == expected
    assert run(data_dir, 2, 3, rank=1, max_batches=9, shard_url="logged://same/{name}") == expected


def test_dataloader_workers_give_the_same_batches_and_read_each_shard_once(data_dir, tmp_path):
    url = upload(data_dir, "workers")
    LoggedStorage.log_file = tmp_path / "requests.log"
    try:
        for rank in range(2):   # one pass (the val split: a finite stream, so workers do not read ahead into epoch 1)
            assert run(url, 2, 2, rank=rank, split="val", workers=2) == run(data_dir, 2, 2, rank=rank, split="val")
    finally:
        LoggedStorage.log_file = None
    lines = [line.split() for line in (tmp_path / "requests.log").read_text().splitlines()]
    assert sorted(name for _, name, _ in lines) == sorted(f"train-0000{i}.tar" for i in range(5) for _ in range(2))
    assert len({pid for pid, _, _ in lines}) >= 2, "both workers read"


def test_a_shard_is_a_plain_tar_of_one_npy_member_per_sample(data_dir):
    with tarfile.open(data_dir / shard_name("train", 1)) as tar:
        members = tar.getmembers()
        first = np.load(io.BytesIO(tar.extractfile(members[0]).read()))
    assert [m.name for m in members] == [f"train-00001-{i:06d}.tokens.npy" for i in range(13)] + ["__crc32__"]
    assert all(m.mtime == 0 for m in members)
    assert first.dtype == np.dtype("<u2") and first.tolist() == [7] * SAMPLE_LEN


def test_webdataset_reads_one_row_per_sequence(data_dir):
    import webdataset as wds

    rows = list(wds.WebDataset(str(data_dir / shard_name("train", 1)), shardshuffle=False).decode())
    assert [row["__key__"] for row in rows] == [f"train-00001-{i:06d}" for i in range(13)]
    assert [row["tokens.npy"].tolist() for row in rows] == [[n] * SAMPLE_LEN for n in range(7, 20)]


def test_hugging_face_datasets_reads_one_row_per_sequence_with_its_document_starts(tmp_path):
    import datasets

    root = write_numbered_shards(tmp_path / "bounded", boundaries=True)
    files = sorted(str(p) for p in root.glob("train-*.tar"))
    rows = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                 cache_dir=str(tmp_path / "hf_cache"))
    assert len(rows) == sum(SHARD_SIZES)
    assert [row[0] for row in rows["tokens.npy"]] == list(range(sum(SHARD_SIZES)))
    starts = np.unpackbits(np.array(rows[23]["doc_starts.packbits.npy"], dtype=np.uint8), count=SAMPLE_LEN)
    assert starts.tolist() == [int(p == 23 % SAMPLE_LEN) for p in range(SAMPLE_LEN)]   # 23: odd, starts at 3


def test_pipe_commands_are_refused_before_launch_naming_the_key(data_dir):
    problems = validate_train(compose_config(f"data.dir={data_dir}", "data.shard_url='pipe:cat {name}'"))
    assert any(p.startswith("data.shard_url=") and "fsspec URL" in p for p in problems), problems


def test_shards_of_an_older_format_are_refused_with_what_to_do(data_dir, tmp_path):
    old = copy_dir(data_dir, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    for version in (2, 3):
        (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
        with pytest.raises(ValueError, match=rf"format version {version}, this distlm reads version 4.*preprocess the "
                                             r"data again"):
            loader(old)


# ---------------------------------------------------------------- integrity

def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def token_offset(data_dir: Path, index: int) -> int:
    """Where sample `index`'s first token id lies in its shard."""
    layout = Manifest.load(data_dir).layout
    return index * layout.stride + layout.tokens_at


def test_a_changed_sample_fails_its_crc32_naming_shard_and_sample(data_dir, tmp_path):
    changed_dir = copy_dir(data_dir, tmp_path / "changed")
    changed = changed_dir / shard_name("train", 2)
    data = bytearray(changed.read_bytes())
    at = token_offset(changed_dir, 3)
    data[at: at + 2] = np.array([999], dtype=np.uint16).tobytes()   # sample 3 of train-00002 (sample number 23)
    changed.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00002.tar: sample 3 \(train-00002-000003\) fails its crc32"):
        run(changed_dir, 1, 5, split="val", shuffle=False)
    with pytest.raises(ShardError, match=r"train-00002.tar: sample 3 \(train-00002-000003\)"):
        Manifest.load(changed_dir).verify()
    unchecked = sum(run(changed_dir, 1, 5, split="val", shuffle=False, verify=False), [])
    assert 999 in unchecked and 23 not in unchecked   # the sample still parses: only its crc32 tells


def test_a_sample_moved_to_another_place_fails_its_check(data_dir, tmp_path):
    moved_dir = copy_dir(data_dir, tmp_path / "moved")
    moved = moved_dir / shard_name("train", 0)
    data = bytearray(moved.read_bytes())
    stride = Manifest.load(moved_dir).layout.stride
    data[:stride], data[stride: 2 * stride] = data[stride: 2 * stride], data[:stride]   # samples 0 and 1 swapped
    moved.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00000.tar: sample 0 \(train-00000-000000\) fails its crc32 \(block 0; 2 of"):
        run(moved_dir, 1, 5, split="val", shuffle=False)


def test_a_missing_or_truncated_shard_raises_an_error_naming_it(data_dir, tmp_path):
    broken_dir = copy_dir(data_dir, tmp_path / "broken")
    broken = broken_dir / shard_name("train", 3)
    broken.write_bytes(broken.read_bytes()[: token_offset(broken_dir, 4) + 5])
    with pytest.raises(ShardError, match=r"train-00003.tar ends before sample 4"):
        run(broken_dir, 1, 5, split="val", shuffle=False)
    with pytest.raises(ShardError, match="train-00003.tar"):
        Manifest.load(broken_dir).verify()
    broken.unlink()
    with pytest.raises(ShardError, match="cannot read shard .*train-00003.tar"):
        run(broken_dir, 1, 5, split="val", shuffle=False)


# ---------------------------------------------------------------- document boundaries, waiting

def test_document_boundaries_come_with_the_tokens(tmp_path):
    root = write_numbered_shards(tmp_path / "bounded", boundaries=True)
    for tokens, starts in loader(root, 1, 5, doc_boundaries=True).iter_batches(max_batches=9):
        assert starts.dtype == torch.uint8 and starts.shape == tokens.shape
        for n, row in zip(tokens[:, 0].tolist(), starts.tolist()):
            start = n % SAMPLE_LEN   # and even samples begin with a document (write_numbered_shards)
            assert row == [int(p == start or (p == 0 and n % 2 == 0)) for p in range(SAMPLE_LEN)]
    with pytest.raises(ValueError, match="keep_doc_boundaries"):
        loader(write_numbered_shards(tmp_path / "plain"), doc_boundaries=True)


def test_the_loader_adds_up_the_time_a_consumer_waits_for_batches(data_dir):
    url = upload(data_dir, "slow")
    LoggedStorage.delay = 0.05   # slow storage: each batch of range requests takes 50 ms
    try:
        source = loader(url, 1, 5, split="val", shuffle=False, window=1)
        batches = source.iter_batches()
        next(batches)
        time.sleep(0.2)   # the consumer's own work is not waiting
        rest = list(batches)
    finally:
        LoggedStorage.delay = 0.0
    assert len(rest) == 8
    waited = source.wait_seconds()
    assert 5 * 0.05 <= waited < 0.2 + 5 * 0.05, waited   # one request batch per shard, none of the consumer's sleep
    assert source.wait_seconds() == 0.0


# ---------------------------------------------------------------- per-rank reads, on real gloo ranks

SCALE_SIZES = [700, 650, 800, 500, 750, 600]   # 4,000 samples of 128 tokens: 1,024 bytes each, ~4 MB


def _read_one_epoch(rank: int, world: int, data_dir: str, out: str) -> None:
    """Rank `rank` of `world` data-parallel ranks reads its share of epoch 0 from local disk (bytes counted by
    the kernel: /proc/self/io rchar) and from object storage (bytes the storage served)."""
    url = upload(Path(data_dir), "scale")
    next(loader(data_dir, window=1000).iter_batches())   # the first use's lazy imports are not reads of data
    micro, result = 10, {}
    for where, source in (("local", data_dir), ("object", url)):
        shards = loader(source, world, micro, rank, window=1000)
        batches = shards.iter_batches(max_batches=4000 // (micro * world))
        rchar, served = _rchar(), LoggedStorage.served
        samples = sum((batch[:, 0].tolist() for batch in batches), [])
        result[where] = {"bytes": _rchar() - rchar if where == "local" else LoggedStorage.served - served,
                         "samples": len(samples)}
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(result))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_each_rank_reads_only_its_share_of_the_bytes(tmp_path):
    data_dir = write_numbered_shards(tmp_path / "scale", sizes=SCALE_SIZES, sample_len=128)
    record = Manifest.load(data_dir).layout.stride
    for world in (1, 2, 4):
        run_ranks(_read_one_epoch, world, world, str(data_dir), str(tmp_path))
    read = {(w, r): json.loads((tmp_path / f"{w}-{r}.json").read_text()) for w in (1, 2, 4) for r in range(w)}
    for where in ("local", "object"):
        whole = read[1, 0][where]["bytes"]
        assert read[1, 0][where]["samples"] == 4000 and 4000 * record <= whole < 1.1 * 4000 * record, where
        for world in (2, 4):
            for rank in range(world):
                assert read[world, rank][where]["samples"] == 4000 // world
                share = read[world, rank][where]["bytes"] / (whole / world)
                assert 0.9 < share < 1.1, (where, world, rank, share)


def _tensor_parallel_pair(rank: int, data_dir: str, out: str) -> None:
    """4 ranks = 2 data-parallel replicas x 2 tensor-parallel ranks; each replica's TP group shares its batches."""
    from distlm.parallel.layout import make_layout

    layout = make_layout(tp=2, pp=1)
    url = upload(Path(data_dir), "tp")
    served = LoggedStorage.served
    source = loader(url, layout.dp, 3, layout.dp_rank, window=8, doc_boundaries=True, broadcast_group=layout.tp_group)
    batches = [(t.tolist(), s.tolist()) for t, s in source.iter_batches(max_batches=12)]
    val = [t.tolist() for t, _ in loader(url, layout.dp, 3, layout.dp_rank, split="val", shuffle=False,
                                         doc_boundaries=True, broadcast_group=layout.tp_group).iter_batches()]
    Path(out, f"tp-{rank}.json").write_text(json.dumps({"dp_rank": layout.dp_rank, "tp_rank": layout.tp_rank,
                                                        "bytes": LoggedStorage.served - served, "batches": batches,
                                                        "val": val}))


def test_tensor_parallel_ranks_get_their_batches_from_one_reader(tmp_path):
    data_dir = write_numbered_shards(tmp_path / "tp", boundaries=True)
    run_ranks(_tensor_parallel_pair, 4, str(data_dir), str(tmp_path))
    ranks = [json.loads((tmp_path / f"tp-{r}.json").read_text()) for r in range(4)]
    for dp_rank in range(2):
        reader, receiver = sorted((r for r in ranks if r["dp_rank"] == dp_rank), key=lambda r: r["tp_rank"])
        own = loader(data_dir, 2, 3, dp_rank, window=8, doc_boundaries=True)
        assert reader["batches"] == receiver["batches"] == [[t.tolist(), s.tolist()]
                                                            for t, s in own.iter_batches(max_batches=12)]
        assert reader["val"] == receiver["val"] and len(reader["val"]) == 45 // 6
        assert reader["bytes"] > 0 and receiver["bytes"] == 0


def test_a_context_parallel_rank_reads_and_verifies_only_its_slice_of_every_sample(tmp_path):
    data_dir = write_numbered_shards(tmp_path / "long", boundaries=True, sizes=[40, 40], sample_len=4097)
    next(loader(data_dir, split="val", shuffle=False).iter_batches())   # lazy imports are not reads of data

    def read(part: slice | None) -> tuple[int, list]:
        """Bytes this process reads for one pass with tokens `part`, and its first batch."""
        rchar = _rchar()
        batches = [b for b, _ in loader(data_dir, 1, 8, split="val", shuffle=False, tokens=part,
                                        doc_boundaries=True).iter_batches()]
        return _rchar() - rchar, batches[0].tolist()

    whole_bytes, whole = read(None)
    assert np.array(whole).shape == (8, 4097)
    for cp in (2, 4):
        length = 4096 // cp
        for rank in range(cp):   # rank's slice plus one label token (the next rank's first)
            got_bytes, got = read(slice(rank * length, (rank + 1) * length + 1))
            assert got == [row[rank * length: (rank + 1) * length + 1] for row in whole]
            share = got_bytes / (whole_bytes / cp)
            # Its tokens and document starts plus their crc32s, never the headers and padding a whole read takes.
            assert 0.7 < share < 1.05, (cp, rank, share)


def test_a_changed_token_fails_the_crc32_of_the_context_parallel_rank_that_reads_it(tmp_path):
    data_dir = write_numbered_shards(tmp_path / "long", sizes=[3], sample_len=4097)
    shard = data_dir / shard_name("train", 0)
    data = bytearray(shard.read_bytes())
    at = token_offset(data_dir, 1) + 3000 * 2   # sample 1, token 3000: block 2 (tokens 2048-3071)
    data[at: at + 2] = np.array([999], dtype=np.uint16).tobytes()
    shard.write_bytes(bytes(data))
    first_half = loader(data_dir, 1, 3, split="val", shuffle=False, tokens=slice(0, 2049))
    assert next(first_half.iter_batches())[1, -1].item() == 1   # rank 0 of cp 2 reads blocks 0-1 only
    with pytest.raises(ShardError, match=r"sample 1 \(train-00000-000001\) fails its crc32 \(block 2;"):
        next(loader(data_dir, 1, 3, split="val", shuffle=False, tokens=slice(2048, 4097)).iter_batches())
