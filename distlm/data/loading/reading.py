"""Reading samples from the shards by their place in a split's stream, and nothing else.

sampling.py says which stream positions a rank takes; this module reads those. A sample lies at a computable
offset of its shard (shards.SampleLayout), so only its bytes are fetched: os.pread on local disk, range requests
through fsspec on object storage (s3://, gs://, https://, ...), touching ranges merged into one request. A rank
that needs only a slice of every sample (context parallelism) reads the crc32 blocks that cover it, and the
slice's last token (a label, checked by the next rank) even where it lies in the next block. Each block read is
checked against its crc32 as it is read.
"""

from __future__ import annotations

import os
from typing import Iterator

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from distlm.config import DataConfig
from distlm.data.loading.sampling import StreamPlan
from distlm.data.shards import Manifest, SampleLayout, ShardError, ShardInfo, verify_blocks


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


def blocks_for(layout: SampleLayout, part: slice) -> tuple[range, int, int]:
    """The crc32 blocks a reader of tokens `part` verifies, and the tokens [lo, hi) it reads: the blocks holding
    the part's tokens, except its last token when that is a label past the part (the next context-parallel
    rank's first token: that rank verifies it)."""
    n, size = layout.sample_len, layout.crc_block
    last = part.stop if part.stop == n else max(part.stop - 1, part.start + 1)
    blocks = range(part.start // size, -(-last // size))
    return blocks, blocks.start * size, max(min(blocks.stop * size, n), part.stop)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for a, b in sorted(ranges):
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [(a, b) for a, b in spans]


def read_samples(url: str, shard: ShardInfo, layout: SampleLayout, indices: np.ndarray, verify: bool,
                 part: slice | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens `part` (None: all) of samples `indices` (ascending, distinct) of one shard: tokens [k, len(part)]
    and, if the samples carry them, document starts (bool [k, len(part)]). Reads only the bytes of those tokens'
    crc32 blocks and their crc32s. ShardError names a shard that cannot be read, is shorter than the manifest
    says, or a sample whose crc32 differs."""
    part = part or slice(0, layout.sample_len)
    stem, stride, size = shard.name.removesuffix(".tar"), layout.stride, layout.dtype.itemsize
    blocks, lo, hi = blocks_for(layout, part)
    whole = (lo, hi) == (0, layout.sample_len)
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1   # runs of neighbouring samples
    runs = [(int(run[0]), int(run[-1]) + 1) for run in np.split(indices, cuts)] if len(indices) else []
    table_at, per = layout.table_at(shard.samples), layout.blocks
    crc_ranges = [(table_at + 4 * (a * per + blocks.start), table_at + 4 * ((b - 1) * per + blocks.stop)) for a, b in runs]
    if whole:   # whole samples: one range per run, headers and padding included
        sample_ranges = [(a * stride, b * stride) for a, b in runs]
    else:
        sample_ranges = [(i * stride + layout.tokens_at + lo * size, i * stride + layout.tokens_at + hi * size)
                         for i in indices.tolist()]
        if layout.doc_boundaries:
            sample_ranges += [(i * stride + layout.starts_at + lo // 8, i * stride + layout.starts_at + -(-hi // 8))
                              for i in indices.tolist()]
    spans = _merged(sample_ranges + (crc_ranges if verify else []))
    try:
        pieces = read_ranges(url, spans)
    except Exception as e:  # noqa: BLE001 - each storage raises its own types
        raise ShardError(f"cannot read shard {url}: {type(e).__name__}: {e}") from e
    for (start, end), piece in zip(spans, pieces):
        if len(piece) != end - start:
            short = start + len(piece)
            raise ShardError(f"shard {url} ends before sample {min(short // stride, shard.samples)} (bytes "
                             f"{start}-{end} asked, {len(piece)} read): it is shorter than the manifest's "
                             f"{shard.bytes} bytes; restore it or preprocess again")
    starts_of = [a for a, _ in spans]

    def fetch(start: int, end: int) -> memoryview:
        k = np.searchsorted(starts_of, start, side="right") - 1
        return memoryview(pieces[k])[start - spans[k][0]: end - spans[k][0]]

    k = len(indices)
    if whole:
        rows = np.frombuffer(b"".join(fetch(a * stride, b * stride) for a, b in runs), np.uint8).reshape(k, stride)
        sample = lambda row, a, b: rows[row, a:b]   # noqa: E731
    else:   # the bytes read, placed at their offsets of a sample; nothing else is looked at
        base = indices * stride
        sample = lambda row, a, b: fetch(int(base[row]) + a, int(base[row]) + b)   # noqa: E731
    if verify:
        table = []   # each sample's crc32s of `blocks`, from its run's range of the table
        for (a, b), (c0, c1) in zip(runs, crc_ranges):
            entries = np.frombuffer(fetch(c0, c1), "<u4")
            table += [entries[j * per: j * per + len(blocks)] for j in range(b - a)]
        table = np.array(table, dtype=np.uint32).reshape(k, len(blocks))
        verify_blocks(url, stem, layout, indices, blocks, sample, table)
    if whole:
        tokens, starts = layout.decode(rows)
        return tokens[:, part], (starts[:, part] if starts is not None else None)
    tokens = np.stack([np.frombuffer(sample(r, layout.tokens_at + part.start * size, layout.tokens_at + part.stop * size),
                                     layout.dtype.newbyteorder("<")) for r in range(k)]).astype(layout.dtype, copy=False)
    if not layout.doc_boundaries:
        return tokens.reshape(k, -1), None
    first_byte = part.start // 8
    bits = np.stack([np.frombuffer(sample(r, layout.starts_at + first_byte, layout.starts_at + -(-part.stop // 8)), np.uint8)
                     for r in range(k)])
    starts = np.unpackbits(bits, axis=1)[:, part.start - 8 * first_byte: part.stop - 8 * first_byte]
    return tokens.reshape(k, -1), starts.astype(bool)


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
        self.tokens = tokens or slice(0, self.layout.sample_len)
        self.num_samples = self.manifest.num_samples(split)

    @property
    def layout(self) -> SampleLayout:
        return self.manifest.layout

    def rank_positions(self, first: int, end: int | None) -> Iterator[np.ndarray]:
        """This rank's stream positions among [first, end) (None: forever), one array per window in stream order
        (empty where the rank has none in a window). A window never splits a shard, so every shard is opened
        once per rank and epoch."""
        for window in self.plan.windows_from(first, end):
            start = window.epoch * self.plan.epoch_samples + window.start
            yield start + self.plan.rank_offsets(window, first, end if end is not None else 2**62)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at stream `positions` (ascending, distinct): tokens [k, len(self.tokens)] (the shards' dtype) and
        where documents start in them (uint8 0/1 [k, sample_len], or [k, 0] without boundaries). Reads only them."""
        plan, layout, part = self.plan, self.layout, self.tokens
        length = part.stop - part.start
        tokens = np.empty((len(positions), length), dtype=layout.dtype)
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
                # Only this rank's part of each sample (and the crc32 blocks that cover it).
                got, doc_starts = read_samples(self.urls[shard], self.shards[shard], layout, index[rows],
                                               self.verify, part)
                tokens[in_epoch[rows]] = got
                if self.boundaries:
                    starts[in_epoch[rows]] = doc_starts
        return tokens, starts
