"""Training batches from the shards, exactly and resumably, for any number of data-parallel ranks.

A rank's samples come from a stream: one dataset's split (reading.SplitStream) or, for the training split of
data.mix, the weighted mixture of several (mixture.MixtureStream). Both say which stream positions the rank takes
and read only those. Ranks that consume the same batches (the tensor-parallel ranks of a pipeline stage) pass
their process group: its first rank reads and broadcasts, the others only receive. With data.loader_workers > 0,
torch DataLoader workers read the rank's chunks of positions in turn (worker w takes chunks w, w + k, ...; the
DataLoader hands them back in order), so the batches are the same whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distlm.config import DataConfig
from distlm.data.loading.mixture import MixtureStream, main_dir
from distlm.data.loading.reading import SplitStream


class _RankSamples(IterableDataset):
    """The rank's samples among stream positions [first, end), chunk by chunk in stream order; DataLoader worker
    w of k reads chunks w, w + k, ... (an empty chunk is still yielded: the DataLoader hands items back in turn)."""

    def __init__(self, stream: SplitStream | MixtureStream, first: int, end: int | None):
        self.stream, self.first, self.end = stream, first, end

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for count, positions in enumerate(self.stream.rank_positions(self.first, self.end)):
            if count % workers == worker:
                yield self.stream.read(positions)


class ShardLoader:
    """Batches [micro_batch_size, sample_len] (int64) of one split for data-parallel rank `dp_rank`, or with
    doc_boundaries=True pairs (tokens, where documents start: uint8 0/1 per token). See
    sampling.py for the order; the train split repeats over epochs forever, other splits make one pass.
    `data` gives the directory (data.dir; the train split of data.mix mixes its sources, other splits read the
    first source) and the loader keys (data.shuffle_window, loader_workers, shard_url, verify_shards). `broadcast_group`: the ranks that consume the same batches (a tensor-parallel group); its
    first rank reads them and broadcasts, the others read nothing. `tokens`: the part of every sample to read (a
    context-parallel rank's slice of the sequence); None = all. `wait_seconds()` is the time spent waiting for
    batches since its last call (loader stalls show up there)."""

    def __init__(self, data: DataConfig, split: str, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool, doc_boundaries: bool = False, broadcast_group=None, tokens: slice | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size <= 0 or data.shuffle_window <= 0 or data.loader_workers < 0:
            raise ValueError(f"need micro_batch_size={micro_batch_size} > 0, data.shuffle_window={data.shuffle_window} "
                             f"> 0 and data.loader_workers={data.loader_workers} >= 0")
        rank = dict(dp_size=dp_size, dp_rank=dp_rank, micro=micro_batch_size, boundaries=doc_boundaries, tokens=tokens)
        self.stream = MixtureStream(data, seed, **rank) if split == "train" and data.mix else \
            SplitStream(dataclasses.replace(data, dir=main_dir(data), mix=None), split, seed, shuffle, **rank)
        self.manifest = self.stream.manifest  # a mixture's sources share its tokenizer and seq_len
        self.split, self.global_batch = split, dp_size * micro_batch_size
        self.micro_batch_size, self.workers, self.doc_boundaries = micro_batch_size, data.loader_workers, doc_boundaries
        self.group = broadcast_group if broadcast_group is not None and dist.get_world_size(broadcast_group) > 1 \
            else None
        self.repeat = split == "train"
        self.num_samples = self.stream.num_samples
        self.batches_per_epoch = self.num_samples // self.global_batch
        self._waited = 0.0

    def iter_batches(self, start_sample: int = 0, max_batches: int | None = None) -> Iterator:
        """Batches from global sample `start_sample` on (all ranks' samples consumed so far: the trainer's
        samples_seen, a multiple of dp_size * micro_batch_size); stops after `max_batches`, or for a
        non-train split after batches_per_epoch."""
        per_batch = self.global_batch
        if start_sample < 0 or start_sample % per_batch:
            raise ValueError(f"start_sample={start_sample} must be a non-negative multiple of "
                             f"dp_size * micro_batch_size = {per_batch}")
        if self.batches_per_epoch == 0 and self.repeat:
            raise ValueError(f"split '{self.split}' of {self.manifest.data_dir} has {self.num_samples} samples, "
                             f"fewer than one batch on every rank ({per_batch})")
        end = None if self.repeat else self.batches_per_epoch * per_batch
        if self.group is None:
            return self._timed(self._batches(start_sample, end, max_batches))
        count = max_batches if end is None else max(0, (end - start_sample) // per_batch)
        if end is not None and max_batches is not None:
            count = min(count, max_batches)
        return self._timed(self._broadcast(start_sample, end, count))

    def wait_seconds(self) -> float:
        """Seconds spent waiting for this loader's batches since the last call."""
        waited, self._waited = self._waited, 0.0
        return waited

    def _timed(self, batches: Iterator) -> Iterator:
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self._waited += time.perf_counter() - start
            yield batch

    def _broadcast(self, first: int, end: int | None, count: int | None) -> Iterator:
        """The group's first rank reads, every rank of the group gets the same batches (count None: forever)."""
        src = dist.get_global_rank(self.group, 0)
        reads = dist.get_rank() == src
        source = self._batches(first, end, count) if reads else None
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        shape = (self.micro_batch_size, self.stream.tokens.stop - self.stream.tokens.start)
        produced = 0
        while count is None or produced < count:
            batch = next(source) if reads else None
            tokens, starts = batch if isinstance(batch, tuple) else (batch, None)
            tokens = tokens.to(device) if reads else torch.empty(shape, dtype=torch.int64, device=device)
            dist.broadcast(tokens, src, group=self.group)
            if self.doc_boundaries:
                starts = starts.to(device) if reads else torch.empty(shape, dtype=torch.uint8, device=device)
                dist.broadcast(starts, src, group=self.group)
            yield (tokens, starts) if self.doc_boundaries else tokens
            produced += 1

    def _batches(self, first: int, end: int | None, max_batches: int | None) -> Iterator:
        micro, produced, carry = self.micro_batch_size, 0, None
        if max_batches == 0:
            return
        for tokens, starts in self._samples(first, end):
            if carry is not None:   # a batch can span two windows
                tokens, starts = np.concatenate([carry[0], tokens]), np.concatenate([carry[1], starts])
            whole = len(tokens) // micro * micro
            for lo in range(0, whole, micro):
                batch = torch.from_numpy(tokens[lo: lo + micro].astype(np.int64))
                yield (batch, torch.from_numpy(starts[lo: lo + micro])) if self.doc_boundaries else batch
                produced += 1
                if produced == max_batches:
                    return
            carry = tokens[whole:], starts[whole:]

    def _samples(self, first: int, end: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        samples = _RankSamples(self.stream, first, end)
        if not self.workers:
            yield from samples
            return
        for tokens, starts in DataLoader(samples, batch_size=None, num_workers=self.workers):
            yield tokens.numpy(), starts.numpy()
