"""Training on several preprocessed datasets at once (data.mix), each feeding a fixed share of the samples.

The mixed stream is position-addressable, like one dataset's stream (sampling.py): which source feeds global
sample i, and which sample of that source's own stream (its seeded epochs of shuffled windows, as if it were
trained on alone), is computed from i. So the trainer's one number, samples_seen, is still the whole data
position: a resume continues exactly, and the samples of a step are the same at any data-parallel size.

The interleave is a chain of Bresenham sequences: source 0 takes stream position p (counted among all) when
floor((p + 1) * f0 + phase0) > floor(p * f0 + phase0), f0 = its weight share; the other positions form the
stream of sources 1.. among which source 1 takes its share f1 = w1 / (w1 + w2 + ...) the same way, and so on.
Integer arithmetic (shares in units of 2^-20), a seeded phase per level. After n samples every source has fed
its share of n within one sample per level (a low-discrepancy order: every batch is close to the weights).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distlm.config import DataConfig
from distlm.data.loading.loader import ShardLoader, read_samples, segments_of

SCALE_BITS = 20   # weight shares are rounded to multiples of 2^-20; p * share stays in int64 up to p ~ 8e12


def main_dir(data: DataConfig) -> str:
    """The dataset whose manifest (tokenizer, seq_len) a run uses: data.dir, or the first source of data.mix
    (all sources must share its tokenizer and seq_len)."""
    return data.mix[0].dir if data.mix else data.dir


class MixSchedule:
    """Global stream position -> (source, position in that source's own stream), from the position alone."""

    def __init__(self, weights: list[float], seed: int):
        if not weights or min(weights) <= 0:
            raise ValueError(f"mixture weights must be positive, got {weights}")
        rest = np.cumsum(np.asarray(weights, dtype=np.float64)[::-1])[::-1]   # w_k + w_k+1 + ...
        shares = np.round(np.asarray(weights) / rest * (1 << SCALE_BITS)).astype(np.int64)
        self.shares = np.clip(shares, 1, 1 << SCALE_BITS)
        self.shares[-1] = 1 << SCALE_BITS   # the last source takes every position left to it
        self.phases = np.random.default_rng([seed, 0x6D6978]).integers(0, 1 << SCALE_BITS, len(weights))

    def _taken(self, level: int, p: np.ndarray) -> np.ndarray:
        """How many of the first p positions of level `level`'s stream its source takes (0 at p = 0: phase < 2^20)."""
        return (p * self.shares[level] + self.phases[level]) >> SCALE_BITS

    def counts(self, n: int) -> np.ndarray:
        """Samples each source has fed among global stream samples [0, n)."""
        out, p = np.zeros(len(self.shares), dtype=np.int64), np.int64(n)
        for level in range(len(self.shares)):
            out[level] = self._taken(level, p)
            p = p - out[level]
        return out

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position within the source's stream) of each global stream position."""
        p = np.asarray(positions, dtype=np.int64)
        source = np.full(len(p), len(self.shares) - 1, dtype=np.int64)
        index = p.copy()
        open_ = np.ones(len(p), dtype=bool)   # not yet given to a source; index = position in this level's stream
        for level in range(len(self.shares) - 1):
            q = index[open_]
            before, after = self._taken(level, q), self._taken(level, q + 1)
            takes = after > before
            rows = np.flatnonzero(open_)
            source[rows[takes]] = level
            index[rows] = np.where(takes, before, q - before)   # its place in the source's, or the next level's, stream
            open_[rows[takes]] = False
        return source, index


def read_stream(source: ShardLoader, positions: np.ndarray, boundaries: bool) -> tuple[np.ndarray, np.ndarray]:
    """Samples at `positions` (ascending, distinct) of one source's own stream (its StreamPlan's epochs of
    shuffled windows): tokens [k, sample_len] int64, per-token document numbers (or [k, 0]). Reads only them."""
    plan, fmt = source.plan, source.manifest.record
    tokens = np.empty((len(positions), fmt.sample_len), dtype=np.int64)
    segments = np.zeros((len(positions), fmt.sample_len if boundaries else 0), dtype=np.int32)
    epoch_of = positions // plan.epoch_samples
    for epoch in np.unique(epoch_of):
        windows = plan.windows(int(epoch))
        starts = np.array([w.start for w in windows])
        in_epoch = np.flatnonzero(epoch_of == epoch)
        within = positions[in_epoch] - epoch * plan.epoch_samples
        window_of = np.searchsorted(starts, within, side="right") - 1
        shard_of, index = np.empty(len(within), dtype=np.int64), np.empty(len(within), dtype=np.int64)
        for w in np.unique(window_of):
            sel = np.flatnonzero(window_of == w)
            window = windows[w]
            shard_of[sel], index[sel] = plan.locate(window, plan.window_order(window)[within[sel] - window.start])
        for shard in np.unique(shard_of):   # a window never splits a shard: one read per shard and epoch
            rows = np.flatnonzero(shard_of == shard)
            rows = rows[np.argsort(index[rows])]   # in file order
            got, doc_starts = read_samples(source.urls[shard], source.shards[shard], fmt, index[rows], source.verify)
            tokens[in_epoch[rows]] = got
            if boundaries:
                segments[in_epoch[rows]] = segments_of(doc_starts)
    return tokens, segments


class _MixedSamples(IterableDataset):
    """The rank's samples of the mixed stream, chunk by chunk (chunk_batches global batches each); DataLoader
    worker w of k reads chunks w, w + k, ..."""

    def __init__(self, loader: "MixtureLoader", first: int, end: int | None):
        self.loader, self.first, self.end = loader, first, end

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lo, chunk = self.first, self.loader.chunk_batches * self.loader.plan.global_batch
        count = 0
        while self.end is None or lo < self.end:
            hi = lo + chunk if self.end is None else min(lo + chunk, self.end)
            if count % workers == worker:
                yield self.loader.take(lo, hi)
            lo, count = hi, count + 1


class MixtureLoader(ShardLoader):
    """Training batches from the weighted mixture data.mix, for one data-parallel rank: a ShardLoader (same
    batches, resume, broadcast and workers) whose global stream interleaves the sources' own streams by
    MixSchedule. Rank r takes slots [r * m, (r + 1) * m) of every global batch, as with one dataset."""

    def __init__(self, data: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 doc_boundaries: bool = False, broadcast_group=None):
        if not data.mix:
            raise ValueError("MixtureLoader needs data.mix")
        super().__init__(dataclasses.replace(data, dir=main_dir(data)), "train", micro_batch_size, dp_rank, dp_size,
                         seed=seed, shuffle=True, doc_boundaries=doc_boundaries, broadcast_group=broadcast_group)
        # Each source's own stream, read by position: a one-rank plan of its shards with the run's seed.
        self.sources = [ShardLoader(dataclasses.replace(data, dir=s.dir), "train", 1, 0, 1, seed=seed, shuffle=True,
                                    doc_boundaries=doc_boundaries) for s in data.mix]
        self.names = [s.name for s in data.mix]
        for name, source in zip(self.names, self.sources):
            if source.manifest.sample_len != self.manifest.sample_len:
                raise ValueError(f"data.mix source {name} has samples of {source.manifest.sample_len} tokens, "
                                 f"{self.names[0]} of {self.manifest.sample_len}: preprocess with one data.seq_len")
            if source.num_samples == 0:
                raise ValueError(f"data.mix source {name} ({source.manifest.data_dir}) has no training samples")
        self.schedule = MixSchedule([s.weight for s in data.mix], seed)
        self.num_samples = sum(s.num_samples for s in self.sources)
        self.batches_per_epoch = self.num_samples // self.plan.global_batch
        self.chunk_batches = max(1, data.shuffle_window // micro_batch_size)   # ~ one window per rank per chunk

    def take(self, first: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The rank's samples among global stream samples [first, end) (whole global batches), in order."""
        g, m = self.plan.global_batch, self.micro_batch_size
        steps = np.arange(first // g, end // g, dtype=np.int64)
        positions = (steps[:, None] * g + self.plan.dp_rank * m + np.arange(m)).ravel()
        source_of, index = self.schedule.assign(positions)
        tokens = np.empty((len(positions), self.manifest.sample_len), dtype=np.int64)
        segments = np.zeros((len(positions), self.manifest.sample_len if self.doc_boundaries else 0), dtype=np.int32)
        for s in np.unique(source_of):
            rows = np.flatnonzero(source_of == s)   # source positions rise with global ones
            tokens[rows], segments[rows] = read_stream(self.sources[s], index[rows], self.doc_boundaries)
        return tokens, segments

    def _samples(self, first: int, end: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        samples = _MixedSamples(self, first, end)
        if not self.workers:
            yield from samples
            return
        for tokens, segments in DataLoader(samples, batch_size=None, num_workers=self.workers):
            yield tokens.numpy(), segments.numpy()

    def progress(self, samples_seen: int) -> dict[str, tuple[int, int]]:
        """Per source: (its samples in global stream samples [0, samples_seen), the epoch it is in: 0 on the
        first pass, 1 once it was exhausted and repeats, ...)."""
        counts = self.schedule.counts(samples_seen)
        return {name: (int(n), max(int(n) - 1, 0) // source.num_samples)
                for name, n, source in zip(self.names, counts, self.sources)}
