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

from distlm.config import DataConfig
from distlm.data.loading.reading import SplitStream

SCALE_BITS = 20   # weight shares are rounded to multiples of 2^-20; p * share stays in int64 up to p ~ 8e12


def main_dir(data: DataConfig) -> str:
    """The dataset whose manifest (tokenizer, seq_len) a run uses: data.dir, or the first source of data.mix
    (all sources must share its tokenizer and seq_len)."""
    return data.mix[0].dir if data.mix else data.dir


class MixSchedule:
    """Global stream position -> (source, position in that source's own stream), from the position alone."""

    def __init__(self, weights: list[float], seed: int):
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


class MixtureStream:
    """The weighted mixture data.mix as one global sample stream, as seen by data-parallel rank `dp_rank`: its
    position p is source MixSchedule.assign(p)'s own stream at the position given there (each source's
    SplitStream read alone, with the run's seed). Rank r takes slots [r * m, (r + 1) * m) of every global batch,
    as with one dataset."""

    def __init__(self, data: DataConfig, seed: int, dp_size: int, dp_rank: int, micro: int, boundaries: bool = False,
                 tokens: slice | None = None):
        self.sources = [SplitStream(dataclasses.replace(data, dir=s.dir, mix=None), "train", seed, shuffle=True,
                                    boundaries=boundaries, tokens=tokens) for s in data.mix]
        self.names = [s.name for s in data.mix]
        self.manifest = self.sources[0].manifest  # every source has its tokenizer and seq_len (validate_mix)
        self.tokens = self.sources[0].tokens
        self.schedule = MixSchedule([s.weight for s in data.mix], seed)
        self.num_samples = sum(s.num_samples for s in self.sources)
        self.global_batch, self.dp_rank, self.micro = dp_size * micro, dp_rank, micro
        self.chunk_batches = max(1, data.shuffle_window // micro)   # ~ one window per rank per chunk
        self.boundaries = boundaries

    def rank_positions(self, first: int, end: int | None) -> Iterator[np.ndarray]:
        """This rank's global stream positions among [first, end) (whole global batches), chunk_batches global
        batches at a time."""
        g, m, lo = self.global_batch, self.micro, first
        while end is None or lo < end:
            hi = lo + self.chunk_batches * g if end is None else min(lo + self.chunk_batches * g, end)
            steps = np.arange(lo // g, hi // g, dtype=np.int64)
            yield (steps[:, None] * g + self.dp_rank * m + np.arange(m)).ravel()
            lo = hi

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The samples at global stream `positions` (ascending), read from their sources."""
        source_of, index = self.schedule.assign(positions)
        length = self.tokens.stop - self.tokens.start
        tokens = np.empty((len(positions), length), dtype=self.manifest.layout.dtype)
        starts = np.zeros((len(positions), length if self.boundaries else 0), dtype=np.uint8)
        for s in np.unique(source_of):
            rows = np.flatnonzero(source_of == s)   # source positions rise with global ones
            tokens[rows], starts[rows] = self.sources[s].read(index[rows])
        return tokens, starts

    def progress(self, samples_seen: int) -> dict[str, tuple[int, int]]:
        """Per source: (its samples in global stream samples [0, samples_seen), the epoch it is in: 0 on the
        first pass, 1 once it was exhausted and repeats, ...)."""
        counts = self.schedule.counts(samples_seen)
        return {name: (int(n), max(int(n) - 1, 0) // source.num_samples)
                for name, n, source in zip(self.names, counts, self.sources)}
