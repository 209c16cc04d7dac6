"""Near-duplicate detection: MinHash signatures of token n-grams and LSH band keys, in numpy.

Signatures are computed on the token ids the tokenize task has just produced (shingles of
`data.minhash_ngram` tokens), so finding near-duplicates costs a few numpy passes over integers instead of
a second tokenization of the text into words. One-permutation hashing with rotation densification
(Shrivastava & Li, 2014) gives `perms` MinHash values from one hash per shingle, where classic MinHash
computes `perms` hashes per shingle: two documents agree in a signature position with probability close
to their Jaccard similarity. Written here because datasketch / rensa work one document and one Python
string per call, which would cost more than the tokenizer.

Documents whose signatures agree on all rows of some band share that band's key; LSH bands and rows are
chosen from the threshold so that pairs above it collide in some band and pairs well below rarely do.
"""

from __future__ import annotations

import numpy as np

from distlm.data.preprocess.dedup import splitmix64

_SHINGLE_MULTIPLIERS = splitmix64(np.arange(1, 65, dtype=np.uint64)) | np.uint64(1)   # odd: invertible
_EMPTY = np.uint64(2**64 - 1)


def lsh_bands(threshold: float, perms: int) -> tuple[int, int]:
    """(bands, rows per band) with bands * rows <= perms minimizing the probability mass of false
    positives below the threshold plus false negatives above it (a band collides with prob. s**rows)."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, perms), float("inf")
    for bands in range(1, perms + 1):
        for rows in range(1, perms // bands + 1):
            hit = 1.0 - (1.0 - s**rows) ** bands
            cost = np.trapezoid(np.where(s < threshold, hit, 1.0 - hit), s)
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def shingle_hashes(tokens: np.ndarray, lengths: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, document index) of every n-gram of consecutive tokens within each document; a document shorter
    than `ngram` tokens is one shingle of all its tokens."""
    ends = np.cumsum(lengths)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    x = tokens.astype(np.uint64) + np.uint64(1)   # +1: token id 0 still changes the hash
    windows = max(len(tokens) - ngram + 1, 0)
    h = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(ngram):
            h += x[j: j + windows] * _SHINGLE_MULTIPLIERS[j]
        valid = np.arange(windows) + ngram <= ends[doc[:windows]]   # the window ends inside its document
        hashes, docs = [h[valid]], [doc[:windows][valid]]
        for d in np.flatnonzero((lengths > 0) & (lengths < ngram)):   # rare: very short documents
            hashes.append(np.array([np.sum(x[ends[d] - lengths[d]: ends[d]] * _SHINGLE_MULTIPLIERS[: lengths[d]])]))
            docs.append(np.array([d]))
    return splitmix64(np.concatenate(hashes).astype(np.uint64)), np.concatenate(docs)


def signatures(tokens: np.ndarray, lengths: np.ndarray, ngram: int, perms: int) -> np.ndarray:
    """MinHash signatures [documents, perms] (uint64) by one-permutation hashing: a shingle's hash picks a
    bin (its low bits) and competes for that bin's minimum with its high bits; an empty bin borrows the
    next non-empty bin to its right (circularly), offset by the distance, so short documents compare
    fairly."""
    h, doc = shingle_hashes(tokens, lengths, ngram)
    bins = (h & np.uint64(perms - 1)).astype(np.int64)
    values = h >> np.uint64(32)
    sig = np.full(len(lengths) * perms, _EMPTY, dtype=np.uint64)
    np.minimum.at(sig, doc * perms + bins, values)
    return _densify(sig.reshape(len(lengths), perms))


def _densify(sig: np.ndarray) -> np.ndarray:
    n, perms = sig.shape
    columns = np.arange(2 * perms)
    filled = np.where(np.tile(sig != _EMPTY, 2), columns, 4 * perms)
    nearest = np.minimum.accumulate(filled[:, ::-1], axis=1)[:, ::-1][:, :perms]   # next filled bin, circular
    distance = (nearest - columns[:perms]).astype(np.uint64)
    has_any = nearest[:, 0] < 4 * perms
    source = np.where(has_any[:, None], nearest % perms, 0)
    with np.errstate(over="ignore"):
        dense = np.take_along_axis(sig, source, axis=1) + (distance << np.uint64(32))
    dense[~has_any] = _EMPTY   # no shingle at all (no tokens): matched by band_keys' fallback
    return dense


def band_keys(sig: np.ndarray, bands: int, rows: int, fallback: np.ndarray) -> np.ndarray:
    """[documents, bands] uint64 keys: equal keys in a band = equal signature rows in that band. A document
    without shingles gets keys from `fallback` (unique per document), so it matches nothing."""
    keys = np.zeros((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            acc = np.full(len(sig), np.uint64(b + 1))
            for r in range(rows):
                acc = splitmix64(acc ^ sig[:, b * rows + r])
            keys[:, b] = acc
    empty = sig[:, 0] == _EMPTY
    keys[empty] = splitmix64(fallback[empty].astype(np.uint64))[:, None]
    return keys


def band_edges(keys: np.ndarray, first_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Edges (document, earliest document with the same key) for one band's keys in document order;
    indices are offset by first_index."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    run_start = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    head = order[np.flatnonzero(run_start)[np.cumsum(run_start) - 1]]   # first (smallest) index of each run
    dup = order != head
    return order[dup] + first_index, head[dup] + first_index
