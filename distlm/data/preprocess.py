"""Raw JSONL → cleaned, deduplicated, tokenized, packed WebDataset shards + manifest, on Ray.

Stages (Ray tasks except where noted):
  read     one task per file chunk: parse, clean, filter, hash each document
  (driver) drop exact duplicates, split train/val by content hash, train or load the tokenizer
  tokenize one task per `data.docs_per_task` documents of a split, in document order: encode, pack
  write    one task per shard of `data.samples_per_shard` samples
Documents stay in Ray's object store; the driver only sees hashes, counts and the tokenizer's sample.
All chunking follows document order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from tokenizers import Tokenizer
from tqdm import tqdm

from distlm.cluster import connect
from distlm.config import Config, ConfigError, DataConfig, raise_if, to_dict, validate_preprocess
from distlm.data import dedup
from distlm.data.clean import REMOVAL_REASONS, read_documents
from distlm.data.pack import pack_sequences, token_dtype
from distlm.data.shards import (FORMAT_VERSION, MANIFEST_FILE, SPLITS, TOKENIZER_FILE, Manifest, ShardInfo,
                                SplitInfo, TokenizerInfo, shard_name, write_shard)
from distlm.data.tokenizer import (eos_id, file_sha256, load_tokenizer, save_bytes, save_tokenizer,
                                   train_tokenizer, vocab_size)

log = logging.getLogger(__name__)

# Big files are read by several tasks, one per byte range of this size (a line belongs to the range
# holding its first byte). Documents keep their file order whatever the size, so the output does not
# depend on it.
READ_CHUNK_BYTES = 64 << 20
_SHARD_FILE = re.compile(r"(train|val)-\d{5}\.tar(\.tmp)?")


def preprocess(cfg: Config) -> Manifest:
    """Preprocess cfg.data.inputs into cfg.data.dir; skip the work if the dir already holds the output
    of the same inputs and config."""
    raise_if(validate_preprocess(cfg))
    d = cfg.data
    files = input_files(d.inputs)
    given_tokenizer = load_tokenizer(d.tokenizer.path, d.tokenizer.eos_token) if d.tokenizer.path else None
    fingerprint = compute_fingerprint(cfg, files)
    data_dir = Path(d.dir)
    existing = _up_to_date_manifest(data_dir, fingerprint)
    if existing is not None:
        log.info("preprocess: %s is up to date (fingerprint %s); skipping", data_dir, fingerprint[:12])
        return existing

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the old manifest is no longer true
    started_ray = not ray.is_initialized()
    connect(cfg.cluster)
    try:
        manifest = _run(cfg, files, fingerprint, given_tokenizer)
    finally:
        if started_ray:
            ray.shutdown()
    _remove_stale_shards(data_dir, manifest)
    log_summary(manifest)
    return manifest


def input_files(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            raise ConfigError(f"data.inputs: '{pattern}': preprocess reads local files only")
        files += [f for f in sorted(glob.glob(pattern)) if f not in files]
    return files


def compute_fingerprint(cfg: Config, files: list[str]) -> str:
    """Hash of everything that determines the output: the data config (except where it is written), each
    input's path, size and modification time, and a given tokenizer's content."""
    data = to_dict(cfg)["data"]
    data.pop("dir")
    data.pop("inputs")
    tokenizer_path = data["tokenizer"].pop("path")
    record = {
        "format_version": FORMAT_VERSION,
        "data": data,
        "inputs": [(f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files],
        "tokenizer_sha256": file_sha256(tokenizer_path) if tokenizer_path else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _up_to_date_manifest(data_dir: Path, fingerprint: str) -> Manifest | None:
    if not (data_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = Manifest.load(data_dir)
    except (ValueError, KeyError, TypeError) as e:
        log.info("preprocess: unreadable %s (%s); preprocessing again", data_dir / MANIFEST_FILE, e)
        return None
    if manifest.fingerprint != fingerprint:
        log.info("preprocess: inputs or data config changed since %s was written; preprocessing again",
                 data_dir / MANIFEST_FILE)
        return None
    problems = manifest.file_problems()
    if problems:
        log.info("preprocess: %s; preprocessing again", problems[0])
        return None
    return manifest


# ---------------------------------------------------------------- Ray tasks

# A block of documents: their UTF-8 bytes joined in one uint8 array + offsets, which Ray passes between
# processes without copying (a list of str would be unpickled by every task that reads it).
def _to_block(encoded_docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(encoded_docs) + 1, dtype=np.int64)
    np.cumsum([len(doc) for doc in encoded_docs], out=offsets[1:])
    return np.frombuffer(b"".join(encoded_docs), dtype=np.uint8), offsets


def _docs_of_block(block: tuple[np.ndarray, np.ndarray], indices) -> list[str]:
    blob, offsets = block
    return [blob[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8") for i in indices]


@ray.remote(num_returns=2)
def _read_chunk(path: str, start: int, end: int, text_field: str, min_chars: int, max_chars: int):
    docs, counts = read_documents(path, text_field, min_chars, max_chars, start, end)
    encoded = [doc.encode("utf-8") for doc in docs]
    return _to_block(encoded), (dedup.digests(encoded), counts)


@ray.remote(num_returns=2)
def _tokenize_and_pack(tokenizer_json: str, sample_len: int, eos: int, vocab: int,
                       indices_per_block: list[np.ndarray], *blocks):
    texts = [doc for block, indices in zip(blocks, indices_per_block) for doc in _docs_of_block(block, indices)]
    tokenizer = Tokenizer.from_str(tokenizer_json)
    token_lists = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    samples, dropped = pack_sequences(token_lists, sample_len, eos, vocab)
    stats = {"docs": len(texts), "samples": len(samples), "doc_tokens": sum(len(t) + 1 for t in token_lists),
             "dropped_tokens": dropped, "text_bytes": sum(len(t.encode("utf-8")) for t in texts)}
    return samples, stats


@ray.remote
def _write_shard(path: str, row_ranges: list[tuple[int, int]], *sample_arrays) -> ShardInfo:
    samples = np.concatenate([a[lo:hi] for a, (lo, hi) in zip(sample_arrays, row_ranges)])
    return write_shard(Path(path), samples)


def _gather(refs_per_split: dict[str, list], stage: str) -> dict[str, list]:
    """Results of every split's tasks, in order, with a progress bar over completed tasks."""
    pending = [ref for refs in refs_per_split.values() for ref in refs]
    with tqdm(total=len(pending), desc=f"preprocess {stage}", unit="task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return {split: ray.get(refs) for split, refs in refs_per_split.items()}


# ---------------------------------------------------------------- the driver

@dataclass
class _Corpus:
    """The cleaned documents, held in Ray's object store as blocks in input order."""
    block_refs: list          # ObjectRef of each block
    block_starts: np.ndarray  # position of each block's first document in the whole corpus
    digests: np.ndarray       # [documents, 16] content hashes
    counts: Counter           # lines read and removed per reason

    def locate(self, positions: np.ndarray) -> list[tuple]:
        """(block ref, indices in that block) of the documents at `positions`, in order."""
        block_ids = np.searchsorted(self.block_starts, positions, side="right") - 1
        return [(self.block_refs[b], positions[block_ids == b] - self.block_starts[b]) for b in np.unique(block_ids)]


def _read(files: list[str], d: DataConfig) -> _Corpus:
    ranges = [(f, lo, lo + READ_CHUNK_BYTES) for f in files
              for lo in range(0, max(Path(f).stat().st_size, 1), READ_CHUNK_BYTES)]
    reads = [_read_chunk.remote(f, lo, hi, d.text_field, d.min_chars, d.max_chars) for f, lo, hi in ranges]
    results = _gather({"all": [info for _, info in reads]}, "read")["all"]
    return _Corpus(block_refs=[block for block, _ in reads],
                   block_starts=np.cumsum([0] + [len(digests) for digests, _ in results]),
                   digests=np.concatenate([digests for digests, _ in results]),
                   counts=sum((counts for _, counts in results), Counter()))


def _make_tokenizer(d: DataConfig, corpus: _Corpus, train_positions: np.ndarray, given: Tokenizer | None,
                    path: Path) -> Tokenizer:
    """The given tokenizer copied as-is (same sha256), or one trained here on the driver (it is
    multi-threaded itself) on a content-determined sample of the training documents."""
    if given is not None:
        save_bytes(Path(d.tokenizer.path).read_bytes(), path)
        return given
    chosen = train_positions[dedup.sample_order(corpus.digests[train_positions])[: d.tokenizer.train_docs]]
    texts = [t for block, idx in corpus.locate(np.sort(chosen)) for t in _docs_of_block(ray.get(block), idx)]
    log.info("preprocess: training a %d-token byte-level BPE on %d documents", d.tokenizer.vocab_size, len(texts))
    tokenizer = train_tokenizer(texts, d.tokenizer.vocab_size, d.tokenizer.eos_token)
    save_tokenizer(tokenizer, path)
    return tokenizer


def _tokenize(corpus: _Corpus, positions: dict[str, np.ndarray], tokenizer: Tokenizer,
              d: DataConfig) -> dict[str, list]:
    """(samples ref, stats) per task: fixed runs of docs_per_task documents of each split, in order."""
    eos, vocab = eos_id(tokenizer, d.tokenizer.eos_token), vocab_size(tokenizer)
    tokenizer_ref = ray.put(tokenizer.to_str())
    packs = {split: [] for split in SPLITS}
    for split in SPLITS:
        for lo in range(0, len(positions[split]), d.docs_per_task):
            pieces = corpus.locate(positions[split][lo: lo + d.docs_per_task])
            packs[split].append(_tokenize_and_pack.remote(
                tokenizer_ref, d.seq_len + 1, eos, vocab, [idx for _, idx in pieces], *[block for block, _ in pieces]))
    stats = _gather({split: [s for _, s in packs[split]] for split in SPLITS}, "tokenize")
    return {split: [(samples, s) for (samples, _), s in zip(packs[split], stats[split])] for split in SPLITS}


def _write(packs: dict[str, list], samples_per_shard: int, data_dir: Path) -> dict[str, list[ShardInfo]]:
    """Shard j of a split holds the split's samples [j * S, (j + 1) * S), whichever tasks made them."""
    writes = {split: [] for split in SPLITS}
    for split in SPLITS:
        task_starts = np.cumsum([0] + [stats["samples"] for _, stats in packs[split]])
        for j, lo in enumerate(range(0, int(task_starts[-1]), samples_per_shard)):
            hi = min(lo + samples_per_shard, int(task_starts[-1]))
            tasks = [t for t in range(len(packs[split])) if task_starts[t] < hi and task_starts[t + 1] > lo]
            row_ranges = [(max(lo, task_starts[t]) - task_starts[t], min(hi, task_starts[t + 1]) - task_starts[t])
                          for t in tasks]
            writes[split].append(_write_shard.remote(
                str(data_dir / shard_name(split, j)), row_ranges, *[packs[split][t][0] for t in tasks]))
    return _gather(writes, "write")


def _run(cfg: Config, files: list[str], fingerprint: str, given_tokenizer: Tokenizer | None) -> Manifest:
    d, data_dir, started = cfg.data, Path(cfg.data.dir), time.time()
    corpus = _read(files, d)
    # Dedup and split on content hashes: the driver holds 16 bytes per document, not its text.
    keep = dedup.first_occurrences(corpus.digests)
    is_val = dedup.validation_mask(corpus.digests, d.val_fraction)
    positions = {"train": np.flatnonzero(keep & ~is_val), "val": np.flatnonzero(keep & is_val)}
    tokenizer_path = data_dir / TOKENIZER_FILE
    tokenizer = _make_tokenizer(d, corpus, positions["train"], given_tokenizer, tokenizer_path)
    read_stats = {
        "files": len(files),
        "read_tasks": len(corpus.block_refs),
        "docs_read": corpus.counts["lines"],
        "removed": {reason: corpus.counts[reason] for reason in REMOVAL_REASONS},
        "duplicates": int(len(keep) - keep.sum()),
    }
    packs = _tokenize(corpus, positions, tokenizer, d)
    del corpus  # its text is no longer needed in the object store
    shards = _write(packs, d.samples_per_shard, data_dir)

    pack_stats = {split: [stats for _, stats in packs[split]] for split in SPLITS}
    stats = {
        **read_stats,
        "tokenizer_trained": given_tokenizer is None,
        **{key: {split: sum(s[key] for s in pack_stats[split]) for split in SPLITS}
           for key in ("docs", "doc_tokens", "dropped_tokens", "text_bytes")},
        "elapsed_s": round(time.time() - started, 3),
    }
    vocab = vocab_size(tokenizer)
    manifest = Manifest(
        fingerprint=fingerprint, seq_len=d.seq_len, sample_len=d.seq_len + 1, dtype=token_dtype(vocab).name,
        tokenizer=TokenizerInfo(file=TOKENIZER_FILE, sha256=file_sha256(tokenizer_path), vocab_size=vocab,
                                eos_id=eos_id(tokenizer, d.tokenizer.eos_token)),
        splits={split: SplitInfo(samples=sum(s.samples for s in shards[split]),
                                 tokens=sum(s.tokens for s in shards[split]), shards=shards[split])
                for split in SPLITS},
        stats=stats, inputs=files, config=to_dict(cfg)["data"])
    manifest.save(data_dir)  # last: a manifest means the directory is complete
    return manifest


def _remove_stale_shards(data_dir: Path, manifest: Manifest) -> None:
    current = {shard.name for split in manifest.splits for shard in manifest.shards(split)}
    stale = [p for p in data_dir.iterdir() if _SHARD_FILE.fullmatch(p.name) and p.name not in current]
    for path in stale:
        path.unlink()
    if stale:
        log.info("preprocess: removed %d stale shard file(s) from an earlier run", len(stale))


def log_summary(m: Manifest) -> None:
    s = m.stats
    doc_tokens = sum(s["doc_tokens"].values())
    dropped = sum(s["dropped_tokens"].values())
    shard_bytes = sum(shard.bytes for split in m.splits for shard in m.shards(split))
    lines = [
        f"documents read {s['docs_read']:,} from {s['files']} file(s) in {s['read_tasks']} read task(s)",
        "removed " + " ".join(f"{reason}={n:,}" for reason, n in s["removed"].items()),
        f"removed duplicates={s['duplicates']:,}",
        f"documents train={s['docs']['train']:,} val={s['docs']['val']:,}",
        f"tokens train={s['doc_tokens']['train']:,} val={s['doc_tokens']['val']:,} (with one EOS per document)",
        f"samples train={m.num_samples('train'):,} val={m.num_samples('val'):,} of {m.sample_len} tokens",
        f"dropped at pack boundaries {dropped:,} tokens ({100 * dropped / max(doc_tokens, 1):.2f}%)",
        f"shards train={len(m.shards('train'))} val={len(m.shards('val'))}, {shard_bytes / 2**20:.1f} MiB "
        f"in {m.data_dir}",
        f"tokenizer vocab={m.vocab_size:,} eos_id={m.eos_id} "
        f"{'trained' if s['tokenizer_trained'] else 'given'}, "
        f"{sum(s['text_bytes'].values()) / max(doc_tokens, 1):.2f} text bytes/token",
        f"elapsed {s['elapsed_s']:.1f} s, {doc_tokens / max(s['elapsed_s'], 1e-9):,.0f} tokens/s",
    ]
    for line in lines:
        log.info("preprocess: %s", line)
    if m.num_samples("train") == 0:
        log.warning("preprocess: no training samples: check data.inputs, data.text_field and the removals above")
