"""Packing documents into fixed-length training samples, and cutting the work into Ray tasks.

Each split is one token stream: its documents in mixed order (see dedup.mix_order), each wrapped in its
special tokens ([BOS] tokens EOS), concatenated. Sample k is stream tokens [k * L, (k + 1) * L) with
L = seq_len + 1 (seq_len inputs and their shifted targets); only the tail after the last whole sample is
dropped (fewer than L tokens per split). Shard j holds samples [j * S, (j + 1) * S). A write task owns a
group of consecutive shards, i.e. one token range of the stream, and gathers its pieces of documents from
every tokenize block (an all-to-all: each token moves once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distlm.data.shards import SampleLayout


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def samples_per_shard(shard_mb: float, fixed: int | None, layout: SampleLayout) -> int:
    """data.samples_per_shard if set, else as many samples as fit in data.shard_mb of shard."""
    if fixed:
        return fixed
    return max(1, int(shard_mb * 2**20) // layout.stride)


@dataclass(frozen=True)
class StreamLayout:
    """How one split's token stream is cut into samples, shards and write tasks."""
    split: str
    sample_len: int
    total_tokens: int           # every document with its special tokens
    samples_per_shard: int
    shard_groups: tuple[tuple[int, int], ...]   # [first, end) shard indices written by one task each

    @property
    def num_samples(self) -> int:
        return self.total_tokens // self.sample_len

    @property
    def dropped_tokens(self) -> int:
        return self.total_tokens - self.num_samples * self.sample_len

    def group_bounds(self) -> np.ndarray:
        """Token offsets where each write group starts, plus the end of the stored stream."""
        firsts = [first * self.samples_per_shard for first, _ in self.shard_groups] + [self.num_samples]
        return np.array(firsts, dtype=np.int64) * self.sample_len

    def shard_samples(self, shard: int) -> tuple[int, int]:
        return shard * self.samples_per_shard, min((shard + 1) * self.samples_per_shard, self.num_samples)


def plan_stream(split: str, total_tokens: int, sample_len: int, per_shard: int, groups: int) -> StreamLayout:
    """Shards split as evenly as possible into at most `groups` write tasks."""
    shards = -(-(total_tokens // sample_len) // per_shard)
    groups = max(1, min(groups, shards))
    edges = np.linspace(0, shards, groups + 1).round().astype(int)
    return StreamLayout(split, sample_len, total_tokens, per_shard,
                        tuple((int(a), int(b)) for a, b in zip(edges, edges[1:]) if b > a))


def with_specials(tokens: np.ndarray, lengths: np.ndarray, eos: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Documents' tokens (concatenated) with BOS before and EOS after each; (tokens, new lengths)."""
    ends = np.cumsum(lengths)
    out = np.insert(tokens, ends, eos)
    lengths = lengths + 1
    if bos is not None:
        out = np.insert(out, np.cumsum(lengths) - lengths, bos)
        lengths = lengths + 1
    return out, lengths


@dataclass
class Pieces:
    """Slices of documents bound for one write group: stream offset, length, and whether each slice begins
    a document; `tokens` concatenates them."""
    starts: np.ndarray
    lengths: np.ndarray
    doc_first: np.ndarray
    tokens: np.ndarray


def cut_pieces(tokens: np.ndarray, lengths: np.ndarray, stream_starts: np.ndarray, bounds: np.ndarray) -> list[Pieces]:
    """Split documents (tokens with specials, concatenated; each starting at stream_starts[i] in the stream,
    -1 = not in this stream) over the write groups whose token ranges are [bounds[g], bounds[g + 1])."""
    offsets = np.cumsum(lengths) - lengths
    parts: list[list[tuple[int, int, bool, np.ndarray]]] = [[] for _ in range(len(bounds) - 1)]
    for d in np.flatnonzero(stream_starts >= 0):
        lo, hi = int(stream_starts[d]), int(stream_starts[d] + lengths[d])
        g = int(np.searchsorted(bounds, lo, side="right")) - 1
        while g < len(parts) and lo < hi and lo < bounds[-1]:
            cut = min(hi, int(bounds[g + 1]))
            src = offsets[d] + (lo - stream_starts[d])
            parts[g].append((lo, cut - lo, lo == stream_starts[d], tokens[src: src + cut - lo]))
            lo, g = cut, g + 1
    return [Pieces(starts=np.array([p[0] for p in group], dtype=np.int64),
                   lengths=np.array([p[1] for p in group], dtype=np.int64),
                   doc_first=np.array([p[2] for p in group], dtype=bool),
                   tokens=np.concatenate([p[3] for p in group]) if group else tokens[:0])
            for group in parts]


def assemble(pieces: list[Pieces], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The stream's tokens [lo, hi) from the pieces every block sent, and the stream offsets where documents
    start in it. Raises if the pieces do not tile the range exactly (a bug, never bad input)."""
    starts = np.concatenate([p.starts for p in pieces])
    lengths = np.concatenate([p.lengths for p in pieces])
    slices = [s for p in pieces if len(p.lengths) for s in np.split(p.tokens, np.cumsum(p.lengths)[:-1])]
    order = np.argsort(starts, kind="stable")
    expected = lo + np.concatenate([[0], np.cumsum(lengths[order])[:-1]]) if len(order) else starts
    if lengths.sum() != hi - lo or not np.array_equal(starts[order], expected) or \
            [len(x) for x in slices] != lengths.tolist():
        raise RuntimeError(f"pieces do not tile stream range [{lo}, {hi})")
    tokens = np.concatenate([slices[i] for i in order]) if len(order) else np.zeros(0, dtype=np.uint16)
    doc_starts = np.sort(np.concatenate([p.starts[p.doc_first] for p in pieces]))
    return tokens, doc_starts


def doc_start_mask(doc_starts: np.ndarray, first_sample: int, count: int, sample_len: int) -> np.ndarray:
    """For samples first_sample .. first_sample + count - 1: bool [count, sample_len], True where a document
    starts (doc_starts: sorted stream offsets)."""
    lo, hi = first_sample * sample_len, (first_sample + count) * sample_len
    inside = doc_starts[np.searchsorted(doc_starts, lo): np.searchsorted(doc_starts, hi)]
    mask = np.zeros(count * sample_len, dtype=bool)
    mask[inside - lo] = True
    return mask.reshape(count, sample_len)
