"""Streaming training batches from the shards, exactly and resumably, for any number of data-parallel ranks.

sampling.py decides which samples a rank reads and in which order; this module reads them: shards are
opened from local disk, an fsspec URL or a webdataset `pipe:` command, checked against their sha256 in
the manifest, and parsed with webdataset. With loader_workers > 0, torch DataLoader workers read the
rank's windows in turn (worker w takes windows w, w + k, ...; the DataLoader hands them back in order),
so the batches are the same whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distlm.data.sampling import StreamPlan, Window
from distlm.data.shards import MANIFEST_FILE, Manifest, ShardError, ShardInfo


# ---------------------------------------------------------------- reading one shard

def fetch(url: str) -> bytes:
    """A shard's bytes: local paths, file://, pipe: and webdataset's URL schemes through webdataset's gopen,
    any other URL (s3://, gs://, memory://, ...) through fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file", "pipe") or (scheme in wds.gopen_schemes and scheme != "gs"):
        with wds.gopen(url) as stream:
            return stream.read()
    with fsspec.open(url, "rb") as stream:
        return stream.read()


def read_shard(url: str, shard: ShardInfo, sample_len: int, verify: bool,
               boundaries: bool) -> tuple[np.ndarray, np.ndarray]:
    """All samples of one shard in file order ([samples, sample_len]) and, if asked, each token's document
    number within its sample ([samples, sample_len], 0 = the document the sample starts in; else [samples, 0]).
    ShardError names a shard that cannot be read, differs from the manifest or is corrupt."""
    try:
        data = fetch(url)
    except Exception as e:  # noqa: BLE001 - each storage raises its own types
        raise ShardError(f"cannot read shard {url}: {type(e).__name__}: {e}") from e
    if verify and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ShardError(f"shard {url} does not match its sha256 in {MANIFEST_FILE} (changed or truncated since "
                         f"preprocessing; preprocess again or restore it)")
    try:
        source = [{"url": url, "stream": io.BytesIO(data)}]
        records = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(source)))
        tokens = [wds.autodecode.npy_loads(r["tokens.npy"]) for r in records]
        starts = [wds.autodecode.npy_loads(r["docstarts.npy"]) for r in records] if boundaries else None
    except Exception as e:  # noqa: BLE001 - tarfile and the decoders raise many types
        raise ShardError(f"corrupt shard {url}: {type(e).__name__}: {e}") from e
    stem = shard.name.removesuffix(".tar")
    if [r["__key__"] for r in records] != [f"{stem}-{i:06d}" for i in range(shard.samples)] or \
            any(t.shape != (sample_len,) for t in tokens):
        raise ShardError(f"corrupt shard {url}: expected {shard.samples} samples of {sample_len} tokens keyed "
                         f"{stem}-NNNNNN, found {len(records)} readable samples")
    tokens = np.stack(tokens) if tokens else np.zeros((0, sample_len), dtype=np.uint16)
    segments = _segments(starts, len(tokens), sample_len) if boundaries else np.zeros((len(tokens), 0), np.int32)
    return tokens, segments


def _segments(starts: list[np.ndarray], n: int, sample_len: int) -> np.ndarray:
    marks = np.zeros((n, sample_len), dtype=np.int32)
    for i, s in enumerate(starts):
        marks[i, s[s > 0]] = 1   # a document starting at 0 is the sample's first segment either way
    return np.cumsum(marks, axis=1, dtype=np.int32)


class _RankSamples(IterableDataset):
    """The rank's samples, window by window in stream order; DataLoader worker w of k reads windows w, w + k, ...
    (a window never splits a shard, so every shard is opened once per rank per epoch)."""

    def __init__(self, plan: StreamPlan, urls: list[str], shards: list[ShardInfo], sample_len: int, verify: bool,
                 boundaries: bool, first: int, end: int | None):
        self.plan, self.urls, self.shards = plan, urls, shards
        self.sample_len, self.verify, self.boundaries, self.first, self.end = sample_len, verify, boundaries, first, end

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for count, window in enumerate(self.plan.windows_from(self.first, self.end)):
            if count % workers == worker:
                yield self._take(window)

    def _take(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        offsets = self.plan.rank_offsets(window, self.first, self.end if self.end is not None else 2**62)
        if not len(offsets):   # still yielded: the DataLoader hands items back in turn, worker by worker
            return np.zeros((0, self.sample_len), np.uint16), np.zeros((0, 0), np.int32)
        read = [read_shard(self.urls[i], self.shards[i], self.sample_len, self.verify, self.boundaries)
                for i in window.shards]
        rows = self.plan.window_order(window)[offsets]
        return np.concatenate([t for t, _ in read])[rows], np.concatenate([s for _, s in read])[rows]


# ---------------------------------------------------------------- the loader of one rank

class ShardLoader:
    """Batches [micro_batch_size, sample_len] (int64) of one split for data-parallel rank `dp_rank`, or with
    doc_boundaries=True pairs (tokens, document number of each token within its sample). See sampling.py
    for the order; the train split repeats over epochs forever, other splits make one pass."""

    def __init__(self, data_dir: str | Path, split: str, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool, shuffle_window: int, workers: int = 0, shard_url: str | None = None,
                 verify: bool = True, doc_boundaries: bool = False):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size <= 0 or shuffle_window <= 0 or workers < 0:
            raise ValueError(f"need micro_batch_size={micro_batch_size} > 0, data.shuffle_window={shuffle_window} > 0 "
                             f"and data.loader_workers={workers} >= 0")
        self.manifest = Manifest.load(data_dir)
        if doc_boundaries and not self.manifest.doc_boundaries:
            raise ValueError(f"{data_dir} has no document boundaries: preprocess with data.keep_doc_boundaries=true")
        self.split, self.shards = split, self.manifest.shards(split)
        self.urls = [self.manifest.shard_url(shard, shard_url) for shard in self.shards]
        self.plan = StreamPlan(shard_sizes=tuple(s.samples for s in self.shards), seed=seed, shuffle=shuffle,
                               min_window=shuffle_window, dp_size=dp_size, dp_rank=dp_rank, micro=micro_batch_size)
        self.micro_batch_size, self.workers, self.verify, self.doc_boundaries = micro_batch_size, workers, verify, \
            doc_boundaries
        self.repeat = split == "train"
        self.num_samples = self.manifest.num_samples(split)
        self.batches_per_epoch = self.num_samples // self.plan.global_batch

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
        return self._batches(start_sample, end, max_batches)

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
        samples = _RankSamples(self.plan, self.urls, self.shards, self.manifest.sample_len, self.verify,
                               self.doc_boundaries, first, end)
        if not self.workers:
            yield from samples
            return
        for tokens, segments in DataLoader(samples, batch_size=None, num_workers=self.workers):
            yield tokens.numpy(), segments.numpy()
