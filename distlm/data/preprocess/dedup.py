"""Content hashes of documents: exact duplicates, near-duplicate clusters, the train/val split, the
tokenizer's sample and the order documents are packed in.

Every decision here depends only on documents' content and their position in the input order, never on
how many tasks read them, so the same corpus always yields the same shards.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distlm.data.preprocess.clean import utf8_buffer

DIGEST_BYTES = 16


def digests(texts: pa.Array) -> np.ndarray:
    """One 16-byte BLAKE2b digest of each text's exact-duplicate key (the cleaned text, lower-cased), as
    uint8 [n, 16]."""
    data, offsets = utf8_buffer(pc.utf8_lower(texts))
    data = memoryview(data)
    joined = b"".join(hashlib.blake2b(data[offsets[i]:offsets[i + 1]], digest_size=DIGEST_BYTES).digest()
                      for i in range(len(offsets) - 1))
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, DIGEST_BYTES)


def first_occurrences(all_digests: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the first of each group of identical documents."""
    keys = np.ascontiguousarray(all_digests).view(np.dtype((np.void, DIGEST_BYTES))).ravel()
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(keys, return_index=True)[1]] = True  # return_index gives first occurrences
    return keep


def _uint64(all_digests: np.ndarray, word: int) -> np.ndarray:
    return np.ascontiguousarray(all_digests[:, 8 * word: 8 * word + 8]).view(">u8").ravel().astype(np.uint64)


def validation_mask(all_digests: np.ndarray, val_fraction: float) -> np.ndarray:
    """Documents held out for validation: the first 8 digest bytes, read as a fraction of 2**64, fall
    below val_fraction."""
    return _uint64(all_digests, 0) < np.uint64(int(val_fraction * 2**64))


def sample_order(all_digests: np.ndarray) -> np.ndarray:
    """A pseudo-random, content-determined order of documents (by their last 8 digest bytes), for
    choosing a deterministic sample: the first k of this order."""
    return np.argsort(_uint64(all_digests, 1), kind="stable")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer: a fast bijective mix of uint64s (numpy wraps mod 2**64 by design)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mix_order(all_digests: np.ndarray, seed: int) -> np.ndarray:
    """The order documents are packed in: sorted by a seeded hash of their content, so each shard holds a
    mix of the whole corpus whatever the input order (book by book, site by site)."""
    with np.errstate(over="ignore"):
        key = splitmix64(_uint64(all_digests, 1) + np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15))
    return np.argsort(key, kind="stable")


def component_minimum(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each of n nodes, the smallest node index of its connected component in the graph of edges
    (a[i], b[i]). Label propagation with pointer jumping (scipy is not a dependency); each round at
    least halves the distance labels still have to travel."""
    labels = np.arange(n, dtype=np.int64)
    a, b = a.astype(np.int64), b.astype(np.int64)
    while True:
        before = labels.copy()
        low = np.minimum(labels[a], labels[b])
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        labels = labels[labels]  # jump to the label's label
        if np.array_equal(labels, before):
            return labels
