"""Reading samples from the shards by their place in a split's stream, and nothing else.

sampling.py says which stream positions a rank takes; this module reads those. A sample's bytes lie at a
computable offset of its shard (shards.RecordFormat), so only its records are fetched: os.pread on local disk,
range requests through fsspec on object storage (s3://, gs://, https://, ...), runs of neighbouring records in
one request. Each record's crc32 is checked as it is read.
"""

from __future__ import annotations

import os
from typing import Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from distlm.config import DataConfig
from distlm.data.loading.sampling import StreamPlan
from distlm.data.shards import Manifest, RecordFormat, ShardError, ShardInfo


def read_ranges(url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, end) of a file for each range: local files with os.pread (unbuffered: nothing but the
    ranges is read), other URLs with fsspec's cat_ranges (concurrent range requests on object stores)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, end - start, start) for start, end in ranges]
        finally:
            os.close(fd)
    found = fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges], on_error="raise")
    return [bytes(x) for x in found]


def read_samples(url: str, shard: ShardInfo, fmt: RecordFormat, indices: np.ndarray,
                 verify: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples `indices` (ascending, distinct) of one shard: tokens [k, sample_len] and, if the records carry
    them, document starts (bool [k, sample_len]). ShardError names a shard that cannot be read, is shorter
    than the manifest says, or a sample whose crc32 differs."""
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1   # runs of neighbouring records: one read each
    runs = [(int(run[0]), int(run[-1]) + 1) for run in np.split(indices, cuts)] if len(indices) else []
    ranges = [fmt.byte_range(a, b) for a, b in runs]
    try:
        pieces = read_ranges(url, ranges)
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - each storage raises its own types
        raise ShardError(f"cannot read shard {url}: {type(e).__name__}: {e}") from e
    for (a, b), (start, end), piece in zip(runs, ranges, pieces):
        if len(piece) != end - start:
            raise ShardError(f"shard {url} ends before sample {a + len(piece) // fmt.size} (bytes {start}-{end} "
                             f"asked, {len(piece)} read): it is shorter than the manifest's {shard.bytes} bytes; "
                             f"restore it or preprocess again")
    records = np.frombuffer(b"".join(pieces), dtype=np.uint8).reshape(len(indices), fmt.size)
    return fmt.decode(url, shard.name.removesuffix(".tar"), records, indices, verify)


class SplitStream:
    """One split of one preprocessed dataset (`data.dir`) as its global sample stream (sampling.StreamPlan),
    readable by stream position; as seen by data-parallel rank `dp_rank` of `dp_size` with `micro` samples per
    micro-batch. `boundaries`: also read where documents start (the data must store them). `tokens`: the part
    of every sample to return (a context-parallel rank's slice); None = all of it."""

    def __init__(self, data: DataConfig, split: str, seed: int, shuffle: bool, dp_size: int = 1, dp_rank: int = 0,
                 micro: int = 1, boundaries: bool = False, tokens: slice | None = None):
        self.manifest = Manifest.load(data.dir)
        if boundaries and not self.manifest.doc_boundaries:
            raise ValueError(f"{data.dir} has no document boundaries: preprocess with data.keep_doc_boundaries=true")
        self.split, self.shards = split, self.manifest.shards(split)
        self.urls = [self.manifest.shard_url(shard, data.shard_url) for shard in self.shards]
        self.plan = StreamPlan(shard_sizes=tuple(s.samples for s in self.shards), seed=seed, shuffle=shuffle,
                               min_window=data.shuffle_window, dp_size=dp_size, dp_rank=dp_rank, micro=micro)
        self.verify, self.boundaries = data.verify_shards, boundaries
        self.tokens = tokens or slice(0, self.record.sample_len)
        self.num_samples = self.manifest.num_samples(split)

    @property
    def record(self) -> RecordFormat:
        return self.manifest.record

    def rank_positions(self, first: int, end: int | None) -> Iterator[np.ndarray]:
        """This rank's stream positions among [first, end) (None: forever), one array per window in stream order
        (empty where the rank has none in a window). A window never splits a shard, so every shard is opened
        once per rank and epoch."""
        for window in self.plan.windows_from(first, end):
            start = window.epoch * self.plan.epoch_samples + window.start
            yield start + self.plan.rank_offsets(window, first, end if end is not None else 2**62)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at stream `positions` (ascending, distinct): tokens [k, sample_len] (the record's dtype) and
        where documents start in them (uint8 0/1 [k, sample_len], or [k, 0] without boundaries). Reads only them."""
        plan, fmt, part = self.plan, self.record, self.tokens
        length = part.stop - part.start
        tokens = np.empty((len(positions), length), dtype=fmt.dtype)
        starts = np.zeros((len(positions), length if self.boundaries else 0), dtype=np.uint8)
        epoch_of = positions // plan.epoch_samples
        for epoch in np.unique(epoch_of):
            windows = plan.windows(int(epoch))
            in_epoch = np.flatnonzero(epoch_of == epoch)
            within = positions[in_epoch] - epoch * plan.epoch_samples
            window_of = np.searchsorted([w.start for w in windows], within, side="right") - 1
            shard_of, index = np.empty(len(within), dtype=np.int64), np.empty(len(within), dtype=np.int64)
            for w in np.unique(window_of):
                sel = np.flatnonzero(window_of == w)
                window = windows[w]
                shard_of[sel], index[sel] = plan.locate(window, plan.window_order(window)[within[sel] - window.start])
            for shard in np.unique(shard_of):   # one read per shard and epoch
                rows = np.flatnonzero(shard_of == shard)
                rows = rows[np.argsort(index[rows])]   # in file order
                # Whole records (each one's crc32 covers it whole), then this rank's part of them.
                got, doc_starts = read_samples(self.urls[shard], self.shards[shard], fmt, index[rows], self.verify)
                tokens[in_epoch[rows]] = got[:, part]
                if self.boundaries:
                    starts[in_epoch[rows]] = doc_starts[:, part]
        return tokens, starts
