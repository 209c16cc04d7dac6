"""distlm.data.loader.ShardLoader on real tar shards of uneven sizes whose samples say who they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distlm.data.loader import ShardLoader
from distlm.data.shards import Manifest, ShardError, SplitInfo, TokenizerInfo, shard_name, write_shard

SHARD_SIZES = [7, 13, 5, 11, 9]   # 45 samples, uneven shards
SAMPLE_LEN = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Shards whose sample number n holds the tokens [n, n, n, n], and their manifest."""
    root = tmp_path_factory.mktemp("numbered")
    shards, first = [], 0
    for index, size in enumerate(SHARD_SIZES):
        samples = np.repeat(np.arange(first, first + size, dtype=np.uint16)[:, None], SAMPLE_LEN, axis=1)
        shards.append(write_shard(root / shard_name("train", index), samples))
        first += size
    split = SplitInfo(samples=first, tokens=first * SAMPLE_LEN, shards=shards)
    Manifest(fingerprint="numbered-test-shards", seq_len=SAMPLE_LEN - 1, sample_len=SAMPLE_LEN, dtype="uint16",
             tokenizer=TokenizerInfo(file="tokenizer.json", sha256="", vocab_size=1000, eos_id=0),
             splits={"train": split, "val": split}, stats={}, inputs=[], config={}).save(root)
    return root


def sample_ids(batches) -> list[list[int]]:
    """Each batch as the list of its sample numbers."""
    return [batch[:, 0].tolist() for batch in batches]


def run(data_dir, dp_size, micro, seed=1, rank=0, split="train", shuffle=True, **kw) -> list[list[int]]:
    loader = ShardLoader(data_dir, split, micro, rank, dp_size, seed=seed, shuffle=shuffle)
    return sample_ids(loader.iter_batches(**kw))


def test_ranks_get_disjoint_equal_shares_of_the_epoch(data_dir):
    dp, micro = 3, 2
    loaders = [ShardLoader(data_dir, "train", micro, r, dp, seed=7, shuffle=True) for r in range(dp)]
    assert {loader.batches_per_epoch for loader in loaders} == {45 // (dp * micro)}
    per_rank = [sample_ids(loader.iter_batches(max_batches=loader.batches_per_epoch)) for loader in loaders]
    assert all(len(batches) == 7 and all(len(b) == micro for b in batches) for batches in per_rank)
    samples = [{n for batch in batches for n in batch} for batches in per_rank]
    assert sum(len(s) for s in samples) == len(set.union(*samples)) == 42   # disjoint; a tail of 3 dropped
    # The union is the epoch's global order (what one rank taking one sample at a time sees) minus its
    # tail, dealt round-robin.
    order = sum(run(data_dir, 1, 1, seed=7, max_batches=45), [])
    assert set.union(*samples) == set(order[:42])
    assert [n for batch in per_rank[1] for n in batch] == order[1:42:3]


def test_batches_are_long_tensors_of_whole_samples(data_dir):
    batch = next(ShardLoader(data_dir, "train", 5, 0, 1, seed=0, shuffle=True).iter_batches())
    assert batch.dtype.is_floating_point is False and str(batch.dtype) == "torch.int64"
    assert tuple(batch.shape) == (5, SAMPLE_LEN) and (batch == batch[:, :1]).all()


def test_order_is_a_function_of_the_seed(data_dir):
    assert run(data_dir, 2, 3, seed=5, max_batches=10) == run(data_dir, 2, 3, seed=5, max_batches=10)
    assert run(data_dir, 2, 3, seed=5, max_batches=10) != run(data_dir, 2, 3, seed=6, max_batches=10)


def test_each_epoch_has_a_new_order(data_dir):
    epochs = run(data_dir, 1, 5, max_batches=18)   # 9 batches per epoch
    first, second = sum(epochs[:9], []), sum(epochs[9:], [])
    assert sorted(first) == sorted(second) == list(range(45))
    assert first != second and first != list(range(45))


def test_resume_yields_exactly_the_batches_of_an_uninterrupted_run(data_dir):
    dp, micro = 2, 3   # 7 batches per epoch on each rank
    for rank in range(dp):
        uninterrupted = run(data_dir, dp, micro, rank=rank, max_batches=25)
        for done in (0, 1, 6, 7, 8, 14, 20):
            resumed = run(data_dir, dp, micro, rank=rank, start_sample=done * dp * micro, max_batches=5)
            assert resumed == uninterrupted[done: done + 5], f"rank {rank} resumed after {done} batches"


def test_start_sample_must_be_a_whole_number_of_global_batches(data_dir):
    with pytest.raises(ValueError, match="multiple"):
        ShardLoader(data_dir, "train", 3, 0, 2, seed=0, shuffle=True).iter_batches(start_sample=4)


def test_a_non_train_split_makes_one_pass_in_file_order_without_shuffle(data_dir):
    assert run(data_dir, 1, 5, split="val", shuffle=False) == [list(range(i, i + 5)) for i in range(0, 45, 5)]
    assert run(data_dir, 2, 4, rank=1, split="val", shuffle=False, max_batches=2) == [[1, 3, 5, 7], [9, 11, 13, 15]]


def test_a_corrupt_shard_raises_an_error_naming_it(data_dir, tmp_path):
    for path in data_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    broken = tmp_path / shard_name("train", 2)
    data = bytearray(broken.read_bytes())
    data[600:1200] = b"\xff" * 600   # inside the first member's header and data
    broken.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-00002.tar"):
        run(tmp_path, 1, 5, shuffle=False, split="val")
    with pytest.raises(ShardError, match="train-00002.tar"):
        Manifest.load(tmp_path).verify()
    broken.unlink()
    with pytest.raises(ShardError, match="train-00002.tar"):
        run(tmp_path, 1, 5, shuffle=False, split="val")
