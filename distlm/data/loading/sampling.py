"""Which samples each data-parallel rank reads, in which order: pure index arithmetic, no I/O.

One global stream of samples, the same for every layout: epoch 0's order, then epoch 1's, and so on. An
epoch orders the shards (a permutation from seed + epoch, or file order without shuffle), groups
consecutive shards into windows of at least `shuffle_window` samples, and permutes each window (from seed,
epoch and window): a shuffle buffer that can be seeked. Global micro-batch k is stream samples
[k * G, (k + 1) * G) with G = dp_size * micro_batch_size; rank r takes [k * G + r * m, k * G + (r + 1) * m).

So a step sees the same samples whatever the layout (dp 2 x micro 4 = dp 1 x micro 8), every rank gets a
batch at every step however uneven the shards, and the position is one number: global samples consumed
(the trainer's samples_seen). Resuming at it continues exactly; with another dp_size or micro-batch size,
the rest of the stream is shared among the new ranks: nothing repeats, nothing is skipped. A window never
splits a shard, so a rank (or a DataLoader worker) opens each shard once per epoch, and reads there only
the samples it takes (`locate` says where they are): 1/dp_size of the data per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Window:
    epoch: int
    index: int                # within the epoch
    shards: tuple[int, ...]   # manifest indices of its shards, in reading order
    start: int                # epoch position (sample number within the epoch) of its first sample
    size: int


@dataclass(frozen=True)
class StreamPlan:
    """The global sample stream of one split, as seen by one rank."""
    shard_sizes: tuple[int, ...]
    seed: int
    shuffle: bool
    min_window: int
    dp_size: int
    dp_rank: int
    micro: int

    @property
    def epoch_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def global_batch(self) -> int:
        return self.dp_size * self.micro

    def windows(self, epoch: int) -> list[Window]:
        """The epoch's windows: runs of consecutive shards (in the epoch's shard order) of >= min_window samples."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_sizes)) if self.shuffle \
            else np.arange(len(self.shard_sizes))
        windows, group, start, size = [], [], 0, 0
        for shard in order:
            group.append(int(shard))
            size += self.shard_sizes[shard]
            if size >= self.min_window:
                windows.append(Window(epoch, len(windows), tuple(group), start, size))
                group, start, size = [], start + size, 0
        if group:
            windows.append(Window(epoch, len(windows), tuple(group), start, size))
        return windows

    def window_order(self, window: Window) -> np.ndarray:
        if not self.shuffle:
            return np.arange(window.size)
        return np.random.default_rng([self.seed, window.epoch, window.index]).permutation(window.size)

    def rank_offsets(self, window: Window, first: int, end: int) -> np.ndarray:
        """Offsets (in the window's shuffled order) of this rank's samples among stream samples [first, end)."""
        stream_start = window.epoch * self.epoch_samples + window.start
        lo, hi = max(first - stream_start, 0), min(end - stream_start, window.size)
        offsets = np.arange(lo, max(lo, hi))
        slot = (stream_start + offsets) % self.global_batch
        return offsets[(slot >= self.dp_rank * self.micro) & (slot < (self.dp_rank + 1) * self.micro)]

    def locate(self, window: Window, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window positions (0 .. size - 1, in its shards' reading order) -> (manifest shard index, sample index
        within that shard)."""
        sizes = np.array([self.shard_sizes[s] for s in window.shards], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        k = np.searchsorted(starts, positions, side="right") - 1
        return np.array(window.shards, dtype=np.int64)[k], positions - starts[k]

    def windows_from(self, first: int, end: int | None) -> Iterator[Window]:
        """The windows holding stream samples [first, end) in order (end None: forever)."""
        if self.epoch_samples == 0:
            return
        epoch = first // self.epoch_samples
        while end is None or epoch * self.epoch_samples < end:
            for window in self.windows(epoch):
                stream_end = epoch * self.epoch_samples + window.start + window.size
                if stream_end <= first:
                    continue
                if end is not None and stream_end - window.size >= end:
                    return
                yield window
            epoch += 1
