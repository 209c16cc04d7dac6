"""distlm.data.loader.ShardLoader on real tar shards of uneven sizes whose samples say who they are."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest

from distlm.data.loader import ShardLoader
from distlm.data.shards import Manifest, ShardError, SplitInfo, TokenizerInfo, shard_name, write_shard

SHARD_SIZES = [7, 13, 5, 11, 9]   # 45 samples, uneven shards
SAMPLE_LEN = 4


def write_numbered_shards(root: Path, boundaries: bool = False) -> Path:
    """Shards whose sample number n holds the tokens [n, n, n, n] (and documents starting at n % 4), and
    their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards, first = [], 0
    for index, size in enumerate(SHARD_SIZES):
        numbers = np.arange(first, first + size, dtype=np.uint16)
        samples = np.repeat(numbers[:, None], SAMPLE_LEN, axis=1)
        starts = [np.array([0, n % SAMPLE_LEN] if n % SAMPLE_LEN else [0]) for n in numbers] if boundaries else None
        shards.append(write_shard(root / shard_name("train", index), samples, starts))
        first += size
    split = SplitInfo(samples=first, tokens=first * SAMPLE_LEN, shards=shards)
    Manifest(fingerprint="numbered-test-shards", seq_len=SAMPLE_LEN - 1, sample_len=SAMPLE_LEN, dtype="uint16",
             tokenizer=TokenizerInfo(file="tokenizer.json", sha256="", vocab_size=1000, eos_id=0),
             splits={"train": split, "val": split}, stats={}, inputs=[], config={},
             doc_boundaries=boundaries).save(root)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_numbered_shards(tmp_path_factory.mktemp("numbered"))


def loader(data_dir, dp_size=1, micro=1, rank=0, seed=1, split="train", shuffle=True, window=6, **kw) -> ShardLoader:
    return ShardLoader(data_dir, split, micro, rank, dp_size, seed=seed, shuffle=shuffle, shuffle_window=window, **kw)


def sample_ids(batches) -> list[list[int]]:
    """Each batch as the list of its sample numbers."""
    return [batch[:, 0].tolist() for batch in batches]


def run(data_dir, dp_size=1, micro=1, rank=0, max_batches=None, start=0, **kw) -> list[list[int]]:
    return sample_ids(loader(data_dir, dp_size, micro, rank, **kw).iter_batches(start, max_batches=max_batches))


def global_batches(data_dir, dp_size, micro, steps, start=0, **kw) -> list[list[int]]:
    """Step k's samples over all ranks (rank 0's batch, then rank 1's, ...)."""
    per_rank = [run(data_dir, dp_size, micro, rank=r, max_batches=steps, start=start, **kw) for r in range(dp_size)]
    return [sum((per_rank[r][k] for r in range(dp_size)), []) for k in range(steps)]


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


def test_dataloader_workers_give_the_same_batches_and_open_each_shard_once(data_dir, tmp_path):
    log = tmp_path / "opened.log"
    template = f"pipe:echo {{name}} >> {log} && cat {data_dir}/{{name}}"
    for rank in range(2):   # one pass (the val split: a finite stream, so workers do not read ahead into epoch 1)
        assert run(data_dir, 2, 2, rank=rank, split="val", workers=2, shard_url=template) == \
            run(data_dir, 2, 2, rank=rank, split="val")
    opened = log.read_text().split()
    assert sorted(opened) == sorted(f"train-0000{i}.tar" for i in range(5) for _ in range(2))   # once per rank


def test_a_non_train_split_makes_one_pass_in_file_order_without_shuffle(data_dir):
    assert run(data_dir, 1, 5, split="val", shuffle=False) == [list(range(i, i + 5)) for i in range(0, 45, 5)]
    # Two ranks, batches of 4: 5 steps of 8 samples, the last 5 samples left out; the same count on both.
    assert run(data_dir, 2, 4, rank=1, split="val", shuffle=False) == [list(range(i + 4, i + 8)) for i in range(0, 40, 8)]
    assert len(run(data_dir, 2, 4, rank=0, split="val", shuffle=False)) == 5


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_corrupt_shard_raises_an_error_naming_it(data_dir, tmp_path):
    broken_dir = copy_dir(data_dir, tmp_path / "broken")
    broken = broken_dir / shard_name("train", 2)
    data = bytearray(broken.read_bytes())
    data[600:1200] = b"\xff" * 600   # inside the first member's header and data
    broken.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-00002.tar"):
        run(broken_dir, 1, 5, split="val", shuffle=False, verify=False)
    with pytest.raises(ShardError, match="train-00002.tar"):
        Manifest.load(broken_dir).verify()
    broken.unlink()
    with pytest.raises(ShardError, match="train-00002.tar"):
        run(broken_dir, 1, 5, split="val", shuffle=False)


def test_a_changed_shard_fails_its_checksum_naming_it(data_dir, tmp_path):
    changed_dir = copy_dir(data_dir, tmp_path / "changed")
    changed = changed_dir / shard_name("train", 1)
    data = bytearray(changed.read_bytes())
    last_npy = data.rfind(b"\x93NUMPY")   # the last sample's .npy; its header is 128 bytes
    data[last_npy + 128: last_npy + 130] = np.array([999], dtype=np.uint16).tobytes()
    changed.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00001.tar does not match its sha256"):
        run(changed_dir, 1, 5, split="val", shuffle=False)
    unchecked = sum(run(changed_dir, 1, 5, split="val", shuffle=False, verify=False), [])
    assert 999 in unchecked   # the tar itself still parses: only the checksum tells


def test_shards_stream_from_fsspec_urls_and_pipe_commands(data_dir):
    expected = run(data_dir, 2, 3, rank=1, max_batches=9)
    memory = fsspec.filesystem("memory")
    for path in data_dir.iterdir():
        memory.pipe(f"/numbered/{path.name}", path.read_bytes())
    assert run("memory://numbered", 2, 3, rank=1, max_batches=9) == expected
    assert run(f"file://{data_dir}", 2, 3, rank=1, max_batches=9) == expected
    assert run(data_dir, 2, 3, rank=1, max_batches=9, shard_url="pipe:cat {dir}/{name}") == expected


def test_document_boundaries_come_with_the_tokens(tmp_path):
    root = write_numbered_shards(tmp_path / "bounded", boundaries=True)
    source = loader(root, 1, 5, doc_boundaries=True)
    for tokens, segments in source.iter_batches(max_batches=9):
        for n, seg in zip(tokens[:, 0].tolist(), segments.tolist()):
            start = n % SAMPLE_LEN
            assert seg == ([0] * SAMPLE_LEN if start == 0 else [0] * start + [1] * (SAMPLE_LEN - start))
    with pytest.raises(ValueError, match="keep_doc_boundaries"):
        loader(write_numbered_shards(tmp_path / "plain"), doc_boundaries=True)
