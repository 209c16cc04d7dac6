"""The Ray tasks of preprocessing; preprocess.py wires them together.

  read_block      one input file or byte range: read, clean, filter, hash           -> texts, meta
  tokenize_part   data.tokenize_task_mb of a block's text: tokens + LSH band keys   -> cached on disk
  band_edges      one LSH band over every document: pairs of likely near-duplicates
  partition_block one block's kept documents cut into pieces, one per write group
  write_group     one group of consecutive shards of a split

Tasks, not actors: an actor pool that holds every CPU starves the tasks feeding it (see NOTES); tasks
share the CPUs. Ray retries a task whose worker died (max_retries) and one that hit a storage error.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from tokenizers import Tokenizer

from distlm.data.preprocess import dedup, minhash
from distlm.data.preprocess.clean import apply_filters, clean_texts
from distlm.data.preprocess.pack import Pieces, StreamLayout, assemble, cut_pieces, doc_start_mask, with_specials
from distlm.data.preprocess.pii import Redactor
from distlm.data.preprocess.sources import ReadTask, read_documents
from distlm.data.shards import ShardInfo, shard_name, write_shard
from distlm.files import replacing, write_atomic

RETRY = dict(max_retries=3, retry_exceptions=[OSError])


def max_unit_bytes(max_chars: int) -> int:
    """Longest raw line/unit worth parsing: max_chars characters written as JSON escapes (6 bytes each)."""
    return 6 * max_chars + 4096


@ray.remote(num_returns=2, **RETRY)
def read_block(task: ReadTask, d) -> tuple[pa.Array, dict]:
    """Cleaned, filtered, PII-redacted texts of one read task (as Arrow: zero-copy through the object store)
    and their metadata: digests, UTF-8 sizes, documents/bytes removed per reason, PII replaced per document
    and kind."""
    found = read_documents(task, d.text_field, d.txt_document, max_unit_bytes(d.max_chars))
    texts = clean_texts(pa.array(found.texts, pa.string()), d.unicode_form)
    texts, removed, removed_bytes = apply_filters(texts, d)
    redactor = Redactor.from_config(d.pii)
    texts, pii = redactor.redact(texts) if redactor else (texts, np.zeros((len(texts), 0), np.int32))
    meta = {
        "digests": dedup.digests(texts),
        "text_bytes": pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64),
        "units": found.units,
        "removed": dict(found.removed + removed),
        "removed_bytes": dict(found.removed_bytes + removed_bytes),
        "bad_files": found.bad_files,
        "pii": pii,
    }
    return texts, meta


@ray.remote(**RETRY)
def take_texts(texts: pa.Array, indices: np.ndarray) -> list[str]:
    return texts.take(pa.array(indices, pa.int64())).to_pylist()


@ray.remote(num_returns=3, **RETRY)
def tokenize_part(texts: pa.Array, lo: int, hi: int, tokenizer_json: str, dtype: str, lsh: dict | None,
                  cache: str, block: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Tokens of documents [lo, hi) of a block (no special tokens; concatenated + lengths), their LSH band
    keys, and the lengths again (all the driver fetches); saved to `cache` so a re-run skips this work."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task per CPU already: no thread pool on top
    tokenizer = _tokenizer(tokenizer_json)
    encodings = tokenizer.encode_batch_fast(texts.slice(lo, hi - lo).to_pylist(), add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    if lsh:
        sig = minhash.signatures(tokens, lengths, lsh["ngram"], lsh["perms"])
        fallback = (np.uint64(block) << np.uint64(32)) + np.arange(lo, hi, dtype=np.uint64)  # unique per document
        keys = minhash.band_keys(sig, lsh["bands"], lsh["rows"], fallback)
    else:
        keys = np.zeros((len(lengths), 0), dtype=np.uint64)
    save_npz(Path(cache), tokens=tokens, lengths=lengths, keys=keys)
    return {"tokens": tokens, "lengths": lengths}, keys, lengths


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    """Parsed once per worker process, not once per task (a large vocabulary takes a good fraction of a second)."""
    return Tokenizer.from_str(tokenizer_json)


@ray.remote(num_returns=2, **RETRY)
def load_part(cache: str) -> tuple[dict, np.ndarray]:
    with np.load(cache) as saved:
        return {"tokens": saved["tokens"], "lengths": saved["lengths"]}, saved["keys"]


@ray.remote(**RETRY)
def band_edges(band: int, *keys_per_part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (document, earliest document with the same key in this band), documents numbered in input order."""
    column = np.concatenate([keys[:, band] for keys in keys_per_part]) if keys_per_part else np.zeros(0, np.uint64)
    return minhash.band_edges(column)


@ray.remote(**RETRY)
def partition_block(stream_starts: np.ndarray, split_of: np.ndarray, bounds: list[np.ndarray], eos: int,
                    bos: int | None, *parts: dict) -> list[Pieces]:
    """One block's documents (its parts, in order) cut into pieces for every write group of every split
    (train groups, then val groups). stream_starts[i] = -1: the document was removed."""
    tokens = np.concatenate([p["tokens"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    tokens, lengths = with_specials(tokens, lengths, eos, bos)
    pieces: list[Pieces] = []
    for split, split_bounds in enumerate(bounds):
        pieces += cut_pieces(tokens, lengths, np.where(split_of == split, stream_starts, -1), split_bounds)
    return pieces if len(pieces) > 1 else pieces[0]   # one return value per write group (Ray's num_returns)


@ray.remote(**RETRY)
def write_group(layout: StreamLayout, group: int, data_dir: str, done_dir: str, dtype: str, boundaries: bool,
                *pieces: Pieces) -> tuple[list[ShardInfo], int]:
    """Write the shards of one group of a split; a shard already written by an earlier run (its record in
    done_dir, its file of the recorded size) is kept as it is. Returns (shard infos, how many were kept)."""
    first_shard, end_shard = layout.shard_groups[group]
    lo, hi = layout.group_bounds()[group: group + 2]
    infos = [_finished(Path(done_dir), Path(data_dir), shard_name(layout.split, j)) for j in range(first_shard, end_shard)]
    reused = sum(info is not None for info in infos)
    if reused == len(infos):
        return infos, reused
    tokens, doc_starts = assemble(list(pieces), int(lo), int(hi))
    samples = tokens.astype(dtype).reshape(-1, layout.sample_len)
    first_sample = layout.shard_samples(first_shard)[0]
    for k, j in enumerate(range(first_shard, end_shard)):
        if infos[k] is not None:
            continue
        a, b = layout.shard_samples(j)
        starts = doc_start_mask(doc_starts, a, b - a, layout.sample_len) if boundaries else None
        info = write_shard(Path(data_dir) / shard_name(layout.split, j), samples[a - first_sample: b - first_sample], starts)
        _record(Path(done_dir), info)
        infos[k] = info
    return infos, reused


def _finished(done_dir: Path, data_dir: Path, name: str) -> ShardInfo | None:
    record = done_dir / (name + ".json")
    if not record.is_file():
        return None
    info = ShardInfo(**json.loads(record.read_text()))
    path = data_dir / name
    return info if path.is_file() and path.stat().st_size == info.bytes else None


def _record(done_dir: Path, info: ShardInfo) -> None:
    write_atomic(done_dir / (info.name + ".json"), json.dumps(info.__dict__))


def save_npz(path: Path, **arrays) -> None:
    """np.savez, atomically."""
    with replacing(path) as tmp:
        np.savez(tmp, **arrays)

