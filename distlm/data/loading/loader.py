"""Training batches from the shards, exactly and resumably, for any number of data-parallel ranks.

sampling.py decides which samples a rank takes and in which order; this module reads those and no others.
A sample's bytes lie at a computable offset of its shard (shards.RecordFormat), so a rank fetches only its
own records: os.pread on local disk, range requests through fsspec on object storage (s3://, gs://,
https://, ...), runs of neighbouring records in one request. Each record's crc32 is checked as it is read.
Ranks that consume the same batches (the tensor-parallel ranks of a pipeline stage) pass their process
group: its first rank reads and broadcasts, the others only receive. With data.loader_workers > 0, torch
DataLoader workers read the rank's windows in turn (worker w takes windows w, w + k, ...; the DataLoader
hands them back in order), so the batches are the same whatever the number of workers.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distlm.config import DataConfig
from distlm.data.loading.sampling import StreamPlan, Window
from distlm.data.shards import Manifest, RecordFormat, ShardError, ShardInfo

# ---------------------------------------------------------------- reading samples of one shard

def read_ranges(url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, end) of a file for each range: local files with os.pread (unbuffered: nothing but the
    ranges is read), other URLs with fsspec's cat_ranges (concurrent range requests on object stores)."""
    if url.startswith("pipe:"):
        raise ShardError(f"shard {url}: pipe: commands stream whole shards and cannot read a rank's samples at "
                         f"their offsets; give data.shard_url as a path or fsspec URL template (s3://bucket/set/{{name}})")
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


def segments_of(doc_starts: np.ndarray) -> np.ndarray:
    """Each token's document number within its sample (int32; 0 = the document the sample starts in)."""
    marks = doc_starts.astype(np.int32)
    marks[:, 0] = 0   # a document starting at 0 is the sample's first segment either way
    return np.cumsum(marks, axis=1, dtype=np.int32)


class _RankSamples(IterableDataset):
    """The rank's samples, window by window in stream order; DataLoader worker w of k reads windows w, w + k, ...
    (a window never splits a shard, so every shard is opened once per rank per epoch)."""

    def __init__(self, plan: StreamPlan, urls: list[str], shards: list[ShardInfo], fmt: RecordFormat, verify: bool,
                 boundaries: bool, first: int, end: int | None):
        self.plan, self.urls, self.shards, self.fmt = plan, urls, shards, fmt
        self.verify, self.boundaries, self.first, self.end = verify, boundaries, first, end

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for count, window in enumerate(self.plan.windows_from(self.first, self.end)):
            if count % workers == worker:
                yield self._take(window)

    def _take(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """The rank's samples of one window in its order: (tokens, per-token document numbers or [k, 0])."""
        offsets = self.plan.rank_offsets(window, self.first, self.end if self.end is not None else 2**62)
        shard_of, index = self.plan.locate(window, self.plan.window_order(window)[offsets])
        tokens = np.empty((len(offsets), self.fmt.sample_len), dtype=self.fmt.dtype)
        segments = np.zeros((len(offsets), self.fmt.sample_len if self.boundaries else 0), dtype=np.int32)
        for shard in np.unique(shard_of):   # still yielded when empty: the DataLoader hands items back in turn
            rows = np.flatnonzero(shard_of == shard)
            rows = rows[np.argsort(index[rows])]   # in file order
            got, starts = read_samples(self.urls[shard], self.shards[shard], self.fmt, index[rows], self.verify)
            tokens[rows] = got
            if self.boundaries:
                segments[rows] = segments_of(starts)
        return tokens, segments


# ---------------------------------------------------------------- the loader of one rank

class ShardLoader:
    """Batches [micro_batch_size, sample_len] (int64) of one split for data-parallel rank `dp_rank`, or with
    doc_boundaries=True pairs (tokens, document number of each token within its sample, int32). See
    sampling.py for the order; the train split repeats over epochs forever, other splits make one pass.
    `data` gives the directory and the loader keys (data.shuffle_window, loader_workers, shard_url,
    verify_shards). `broadcast_group`: the ranks that consume the same batches (a tensor-parallel group); its
    first rank reads them and broadcasts, the others read nothing. `wait_seconds()` is the time spent waiting
    for batches since its last call (loader stalls show up there)."""

    def __init__(self, data: DataConfig, split: str, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool, doc_boundaries: bool = False, broadcast_group=None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size <= 0 or data.shuffle_window <= 0 or data.loader_workers < 0:
            raise ValueError(f"need micro_batch_size={micro_batch_size} > 0, data.shuffle_window={data.shuffle_window} "
                             f"> 0 and data.loader_workers={data.loader_workers} >= 0")
        self.manifest = Manifest.load(data.dir)
        if doc_boundaries and not self.manifest.doc_boundaries:
            raise ValueError(f"{data.dir} has no document boundaries: preprocess with data.keep_doc_boundaries=true")
        self.split, self.shards = split, self.manifest.shards(split)
        self.urls = [self.manifest.shard_url(shard, data.shard_url) for shard in self.shards]
        self.plan = StreamPlan(shard_sizes=tuple(s.samples for s in self.shards), seed=seed, shuffle=shuffle,
                               min_window=data.shuffle_window, dp_size=dp_size, dp_rank=dp_rank, micro=micro_batch_size)
        self.micro_batch_size, self.workers, self.verify = micro_batch_size, data.loader_workers, data.verify_shards
        self.doc_boundaries = doc_boundaries
        self.group = broadcast_group if broadcast_group is not None and dist.get_world_size(broadcast_group) > 1 \
            else None
        self.repeat = split == "train"
        self.num_samples = self.manifest.num_samples(split)
        self.batches_per_epoch = self.num_samples // self.plan.global_batch
        self._waited = 0.0

    def iter_batches(self, start_sample: int = 0, max_batches: int | None = None) -> Iterator:
        """Batches from global sample `start_sample` on (all ranks' samples consumed so far: the trainer's
        samples_seen, a multiple of dp_size * micro_batch_size); stops after `max_batches`, or for a
        non-train split after batches_per_epoch."""
        per_batch = self.plan.global_batch
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
        shape = (self.micro_batch_size, self.manifest.sample_len)
        produced = 0
        while count is None or produced < count:
            batch = next(source) if reads else None
            tokens, segments = batch if isinstance(batch, tuple) else (batch, None)
            tokens = tokens.to(device) if reads else torch.empty(shape, dtype=torch.int64, device=device)
            dist.broadcast(tokens, src, group=self.group)
            if self.doc_boundaries:
                segments = segments.to(device) if reads else torch.empty(shape, dtype=torch.int32, device=device)
                dist.broadcast(segments, src, group=self.group)
            yield (tokens, segments) if self.doc_boundaries else tokens
            produced += 1

    def _batches(self, first: int, end: int | None, max_batches: int | None) -> Iterator:
        micro, produced, carry = self.micro_batch_size, 0, None
        if max_batches == 0:
            return
        for tokens, segments in self._samples(first, end):
            if carry is not None:   # a batch can span two windows
                tokens, segments = np.concatenate([carry[0], tokens]), np.concatenate([carry[1], segments])
            whole = len(tokens) // micro * micro
            for lo in range(0, whole, micro):
                batch = torch.from_numpy(tokens[lo: lo + micro].astype(np.int64))
                yield (batch, torch.from_numpy(segments[lo: lo + micro])) if self.doc_boundaries else batch
                produced += 1
                if produced == max_batches:
                    return
            carry = tokens[whole:], segments[whole:]

    def _samples(self, first: int, end: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        samples = _RankSamples(self.plan, self.urls, self.shards, self.manifest.record, self.verify,
                               self.doc_boundaries, first, end)
        if not self.workers:
            yield from samples
            return
        for tokens, segments in DataLoader(samples, batch_size=None, num_workers=self.workers):
            yield tokens.numpy(), segments.numpy()
