"""Streaming training batches from the shards, exactly and resumably, for any number of data-parallel ranks.

Each epoch has one global sample order, a function of (seed, epoch) only: shards in a permuted order,
the samples of each shard in a permuted order (or both in file order without shuffle). Global sample i
of the epoch belongs to rank i % dp_size; the epoch's tail that cannot fill a batch on every rank is
dropped, so all ranks run the same number of steps. Resuming from a count of global samples consumed
continues with exactly the batches an uninterrupted run would have produced next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from distlm.data.shards import Manifest, ShardError, ShardInfo


def read_shard(path: Path, shard: ShardInfo, sample_len: int) -> np.ndarray:
    """All samples of one shard in file order, [samples, sample_len]; ShardError names a bad shard."""
    try:
        dataset = wds.WebDataset([str(path)], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False).decode()
        records = [(sample["__key__"], sample["npy"]) for sample in dataset]
    except Exception as e:
        cause = e.__cause__ or e  # webdataset's DecodingError has no message; its cause does
        raise ShardError(f"corrupt or unreadable shard {path}: {type(cause).__name__}: {cause}") from e
    stem = shard.name.removesuffix(".tar")
    expected_keys = [f"{stem}-{i:06d}" for i in range(shard.samples)]
    if [key for key, _ in records] != expected_keys or any(a.shape != (sample_len,) for _, a in records):
        raise ShardError(f"corrupt shard {path}: expected {shard.samples} samples of {sample_len} tokens "
                         f"keyed {stem}-NNNNNN, found {len(records)} readable samples")
    return np.stack([a for _, a in records]) if records else np.zeros((0, sample_len), dtype=np.int64)


class ShardLoader:
    """Batches [micro_batch_size, sample_len] (int64) of one split for data-parallel rank `dp_rank`.

    The train split repeats over epochs forever; other splits make one pass.
    """

    def __init__(self, data_dir: str | Path, split: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
        self.manifest = Manifest.load(data_dir)
        self.split = split
        self.shards = self.manifest.shards(split)
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.repeat = split == "train"
        self.num_samples = self.manifest.num_samples(split)
        self.samples_per_batch = dp_size * micro_batch_size   # global samples consumed by one batch per rank
        self.batches_per_epoch = self.num_samples // self.samples_per_batch
        self.samples_per_epoch = self.batches_per_epoch * self.samples_per_batch

    def epoch_order(self, epoch: int) -> list[tuple[ShardInfo, np.ndarray]]:
        """The epoch's global sample order: (shard, order of its rows) in the order they are read."""
        shard_ids = np.arange(len(self.shards))
        if self.shuffle:
            shard_ids = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        order = []
        for i in shard_ids:
            rows = np.arange(self.shards[i].samples)
            if self.shuffle:  # seeded per shard, so a resumed run need not read the shards it skips
                rows = np.random.default_rng([self.seed, epoch, int(i)]).permutation(rows)
            order.append((self.shards[i], rows))
        return order

    def _rank_samples(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        """Blocks of this rank's samples of `epoch`, in order, leaving out the first `skip` global samples."""
        first = 0  # global index of the current shard's first sample in the epoch order
        for shard, rows in self.epoch_order(epoch):
            if first >= self.samples_per_epoch:
                return
            global_index = first + np.arange(len(rows))
            mine = (global_index >= skip) & (global_index < self.samples_per_epoch) & \
                   (global_index % self.dp_size == self.dp_rank)
            if mine.any():
                # Every rank reads every shard it needs and keeps its own samples: simple and exact;
                # shards are small next to a training step.
                samples = read_shard(self.manifest.shard_path(shard), shard, self.manifest.sample_len)
                yield samples[rows[mine]]
            first += len(rows)

    def iter_batches(self, start_sample: int = 0, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Batches from global sample `start_sample` on (all ranks' samples consumed so far, a multiple of
        dp_size * micro_batch_size); stops after `max_batches`, or for a non-train split at its end."""
        if start_sample < 0 or start_sample % self.samples_per_batch:
            raise ValueError(f"start_sample={start_sample} must be a non-negative multiple of "
                             f"dp_size * micro_batch_size = {self.samples_per_batch}")
        if self.batches_per_epoch == 0 and self.repeat:
            raise ValueError(f"split '{self.split}' of {self.manifest.data_dir} has {self.num_samples} samples, "
                             f"fewer than one batch on every rank ({self.samples_per_batch})")
        return self._batches(start_sample, max_batches)

    def _batches(self, start_sample: int, max_batches: int | None) -> Iterator[torch.Tensor]:
        if self.samples_per_epoch == 0 or max_batches == 0:
            return
        epoch, skip = divmod(start_sample, self.samples_per_epoch)
        produced = 0
        while True:
            pending = np.zeros((0, self.manifest.sample_len), dtype=self.manifest.dtype)
            for block in self._rank_samples(epoch, skip):
                pending = np.concatenate([pending, block])
                while len(pending) >= self.micro_batch_size:
                    yield torch.from_numpy(pending[: self.micro_batch_size].astype(np.int64))
                    pending = pending[self.micro_batch_size:]
                    produced += 1
                    if produced == max_batches:
                        return
            if not self.repeat:
                return
            epoch, skip = epoch + 1, 0
