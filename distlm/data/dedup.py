"""Content hashes of documents: exact deduplication, the train/val split and the tokenizer's sample.

Every decision here depends only on a document's text, never on file order or on how many workers read
it, so the same corpus always yields the same splits.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DIGEST_BYTES = 16


def digests(encoded_docs: Sequence[bytes]) -> np.ndarray:
    """One 16-byte BLAKE2b digest per UTF-8 document, as uint8 [n, 16]."""
    joined = b"".join(hashlib.blake2b(doc, digest_size=DIGEST_BYTES).digest() for doc in encoded_docs)
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, DIGEST_BYTES)


def first_occurrences(all_digests: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the first of each group of identical documents."""
    keys = np.ascontiguousarray(all_digests).view(np.dtype((np.void, DIGEST_BYTES))).ravel()
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(keys, return_index=True)[1]] = True  # return_index gives first occurrences
    return keep


def _uint64(all_digests: np.ndarray, word: int) -> np.ndarray:
    return np.ascontiguousarray(all_digests[:, 8 * word: 8 * word + 8]).view(">u8").ravel()


def validation_mask(all_digests: np.ndarray, val_fraction: float) -> np.ndarray:
    """Documents held out for validation: the first 8 digest bytes, read as a fraction of 2**64, fall
    below val_fraction."""
    return _uint64(all_digests, 0) < np.uint64(int(val_fraction * 2**64))


def sample_order(all_digests: np.ndarray) -> np.ndarray:
    """A pseudo-random, content-determined order of documents (by their last 8 digest bytes), for
    choosing a deterministic sample: the first k of this order."""
    return np.argsort(_uint64(all_digests, 1), kind="stable")
