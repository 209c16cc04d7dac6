"""Raw text -> cleaned, deduplicated, tokenized, mixed, packed shards + manifest, on Ray.

  1. read + tokenize  per input file / 64 MB range: read, clean, filter, hash (stages.read_block); then per
                      data.tokenize_task_mb of text: tokens + MinHash band keys (stages.tokenize_part). A trained
                      tokenizer is trained on the driver in between, on a content-chosen sample.
  2. deduplicate      exact (digest) on the driver; near (LSH bands, one task per band) -> clusters
  3. plan             train/val by content hash; each split's documents in a seeded content-hash order;
                      stream offsets -> samples -> shards -> write groups
  4. write            every block cuts its documents into pieces per write group; each group writes its shards
The driver holds hashes, lengths and counts, never the text. Every decision depends on content and input
order only, so the shards are byte-identical whatever the cluster. Finished tokenize parts and shards
are recorded under data.dir/.work-<fingerprint>/: a re-run after a crash redoes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
from tokenizers import Tokenizer

from distlm.cluster import connect
from distlm.compat.ray import stop_local_cluster
from distlm.config import Config, raise_if, to_dict
from distlm.data.preprocess import dedup, minhash, pii, stages
from distlm.data.preprocess.pack import plan_stream, samples_per_shard, token_dtype
from distlm.data.preprocess.sources import InputFile, list_inputs, read_tasks
from distlm.data.preprocess.stats import EXACT_DUPLICATE, NEAR_DUPLICATE, Progress, log_summary, removal_table
from distlm.data.preprocess.tokenizer import (load_tokenizer, save_tokenizer, special_ids, special_tokens,
                                              train_tokenizer, vocab_size)
from distlm.data.preprocess.workdir import BlockResult, WorkDir
from distlm.data.shards import (FORMAT_VERSION, MANIFEST_FILE, SPLITS, STATS_FILE, TOKENIZER_FILE, Manifest,
                                 SampleLayout, SplitInfo, TokenizerInfo)
from distlm.files import file_sha256, write_atomic
from distlm.validation import validate_preprocess

log = logging.getLogger(__name__)
LOADER_KEYS = ("shuffle_window", "loader_workers", "shard_url", "verify_shards")  # do not change the shards
_SHARD_FILE = re.compile(r"\.?(train|val)-\d{5}(\.tmp\d+)?\.tar")  # and the temporary names of files.replacing


def preprocess(cfg: Config) -> Manifest:
    """Preprocess cfg.data.inputs into cfg.data.dir; skip the work if the dir already holds the output
    of the same inputs and config, and reuse what an interrupted run finished."""
    raise_if(validate_preprocess(cfg) + pii.config_problems(cfg.data.pii))
    d = cfg.data
    files = list_inputs(d.inputs)  # every path checked readable before any work
    given = load_tokenizer(d.tokenizer.path, special_tokens(d.tokenizer)) if d.tokenizer.path else None
    fingerprint = compute_fingerprint(cfg, files)
    data_dir = Path(d.dir)
    existing = _up_to_date_manifest(data_dir, fingerprint)
    if existing is not None:
        log.info("preprocess: %s is up to date (fingerprint %s); skipping", data_dir, fingerprint[:12])
        return existing

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the old manifest is no longer true
    work = WorkDir.open(data_dir, fingerprint, max(1, round(d.tokenize_task_mb * 2**20)))
    started_ray = not ray.is_initialized()
    connect(cfg.cluster, dashboard=False)  # a local cluster without a dashboard starts faster (Ray Train needs it)
    try:
        manifest = _run(cfg, files, fingerprint, given, work)
    finally:
        if started_ray:
            stop_local_cluster()
    _remove_stale_shards(data_dir, manifest)
    work.remove()
    log_summary(manifest.stats, str(data_dir / STATS_FILE))
    return manifest


def compute_fingerprint(cfg: Config, files: list[InputFile]) -> str:
    """Hash of everything that determines the output: the data config (except where it is written and the
    loader's keys), each input's URL, size and modification time, and a given tokenizer's content."""
    data = to_dict(cfg)["data"]
    for key in ("dir", "inputs", *LOADER_KEYS):
        data.pop(key)
    tokenizer_path = data["tokenizer"].pop("path")
    record = {
        "format_version": FORMAT_VERSION,
        "data": data,
        "inputs": [(f.url, f.size, f.mtime) for f in files],
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


# ---------------------------------------------------------------- 1. read + tokenize

def _read_and_tokenize(files: list[InputFile], d, given: Tokenizer | None, work: WorkDir,
                       seconds: dict) -> tuple[list[BlockResult], Tokenizer]:
    started = time.perf_counter()
    tasks = read_tasks(files, d.txt_document)
    cached = [work.load_block(b) for b in range(len(tasks))]
    reads = {b: stages.read_block.remote(task, d) for b, task in enumerate(tasks) if cached[b] is None}
    tokenizer = given if given is not None else work.load_tokenizer()
    if tokenizer is None:
        tokenizer = _train_tokenizer(d, reads, work, seconds)
    tokenization = _Tokenization(tasks, d, tokenizer, work)
    for b, found in enumerate(cached):
        if found is not None:
            tokenization.reuse(b, found)
    tokenization.run(reads)
    seconds["read_and_tokenize"] = time.perf_counter() - started
    return tokenization.results, tokenizer


class _Tokenization:
    """Stage 1 on the driver: each block's tokenize parts start as soon as the block is read; the driver
    collects only their token counts (and shows progress)."""

    def __init__(self, tasks: list, d, tokenizer: Tokenizer, work: WorkDir):
        self.tasks, self.d, self.work = tasks, d, work
        self.tokenizer_json = ray.put(tokenizer.to_str())
        self.dtype = token_dtype(vocab_size(tokenizer)).name
        self.lsh = _lsh_params(d)
        self.progress = Progress(sum(task.size_hint() for task in tasks))
        self.results: list[BlockResult | None] = [None] * len(tasks)
        self.parts: dict = {}   # lengths ref -> (block, part, first document, end document)

    def reuse(self, b: int, found: tuple) -> None:
        self.results[b] = BlockResult.from_cache(found, b, self.work)
        self.progress.advance(self.tasks[b].size_hint(), len(found[0]["digests"]), self.results[b].token_count())

    def run(self, reads: dict) -> None:
        pending = {meta: b for b, (_, meta) in reads.items()}
        while pending or self.parts:
            ref = ray.wait(list(pending) + list(self.parts), num_returns=1)[0][0]
            if ref in pending:
                b = pending.pop(ref)
                self._start(b, reads.pop(b)[0], ray.get(ref))  # the parts keep the texts alive while they need them
            else:
                self._finish(ref)
        self.progress.close()

    def _start(self, b: int, texts, meta: dict) -> None:
        """A block is read: save its metadata, start tokenizing it in parts of data.tokenize_task_mb of text."""
        self.work.save_meta(b, meta)
        self.results[b] = BlockResult(index=b, meta=meta)
        count = len(meta["digests"])
        bounds = self.work.part_bounds(meta)
        for k, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            tokens, keys, lengths = stages.tokenize_part.remote(texts, lo, hi, self.tokenizer_json, self.dtype, self.lsh,
                                                                str(self.work.part_path(b, k)), b)
            self.results[b].parts.append((tokens, keys))
            self.parts[lengths] = (b, k, lo, hi)
        if not count:
            self.progress.advance(self.tasks[b].size_hint(), 0, 0)

    def _finish(self, ref) -> None:
        b, k, lo, hi = self.parts.pop(ref)
        block = self.results[b]
        block.set_lengths(k, ray.get(ref))
        share = block.meta["text_bytes"][lo:hi].sum() / max(block.meta["text_bytes"].sum(), 1)
        self.progress.advance(self.tasks[b].size_hint() * share, hi - lo, int(block.part_lengths[k].sum()))


def _train_tokenizer(d, reads: dict, work: WorkDir, seconds: dict) -> Tokenizer:
    """Train on data.tokenizer.train_docs documents chosen by content hash among the (exactly deduplicated)
    training documents: the same sample whatever the input order or the cluster."""
    metas = ray.get([meta for _, meta in reads.values()])
    digests = np.concatenate([m["digests"] for m in metas])
    block_of = np.repeat(list(reads), [len(m["digests"]) for m in metas])
    local = np.concatenate([np.arange(len(m["digests"])) for m in metas])
    eligible = np.flatnonzero(dedup.first_occurrences(digests) & ~dedup.validation_mask(digests, d.val_fraction))
    chosen = np.sort(eligible[dedup.sample_order(digests[eligible])[: d.tokenizer.train_docs]])
    picks = [stages.take_texts.remote(reads[b][0], local[chosen[block_of[chosen] == b]]) for b in reads]
    texts = [text for part in ray.get(picks) for text in part]
    log.info("preprocess: training a %d-token byte-level BPE on %d documents", d.tokenizer.vocab_size, len(texts))
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, d.tokenizer.vocab_size, special_tokens(d.tokenizer))
    seconds["train_tokenizer"] = time.perf_counter() - started   # part of read_and_tokenize
    work.save_tokenizer(tokenizer)
    return tokenizer


def _lsh_params(d) -> dict | None:
    if d.near_dup_threshold is None:
        return None
    bands, rows = minhash.lsh_bands(d.near_dup_threshold, d.minhash_perms)
    return {"ngram": d.minhash_ngram, "perms": d.minhash_perms, "bands": bands, "rows": rows}


# ---------------------------------------------------------------- 2. deduplicate

def _deduplicate(blocks: list[BlockResult], d, lsh: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, first-of-its-exact-group) masks over all documents in input order."""
    digests = np.concatenate([b.meta["digests"] for b in blocks])
    exact_first = dedup.first_occurrences(digests) if d.dedup_exact else np.ones(len(digests), dtype=bool)
    if lsh is None or not len(digests):
        return exact_first, exact_first
    keys = [keys for b in blocks for _, keys in b.parts]
    edges = ray.get([stages.band_edges.remote(band, *keys) for band in range(lsh["bands"])])
    a = np.concatenate([e[0] for e in edges])
    b = np.concatenate([e[1] for e in edges])
    cluster_first = dedup.component_minimum(len(digests), a, b) == np.arange(len(digests))
    return exact_first & cluster_first, exact_first


# ---------------------------------------------------------------- 3. plan and 4. write

def _plan(blocks, keep, d, per_shard: int, specials: int):
    """Each split's documents in mixed order: stream offset and split of every document, and the layouts."""
    digests = np.concatenate([b.meta["digests"] for b in blocks])
    lengths = np.concatenate([b.lengths() for b in blocks]) + specials
    is_val = dedup.validation_mask(digests, d.val_fraction)
    stream_starts = np.full(len(digests), -1, dtype=np.int64)
    split_of = np.full(len(digests), -1, dtype=np.int8)
    layouts = []
    for s, split in enumerate(SPLITS):
        docs = np.flatnonzero(keep & (is_val == (split == "val")))
        order = docs[dedup.mix_order(digests[docs], d.mix_seed)]
        stream_starts[order] = np.cumsum(lengths[order]) - lengths[order]
        split_of[order] = s
        layouts.append(plan_stream(split, int(lengths[order].sum()), d.seq_len + 1, per_shard, len(blocks)))
    return stream_starts, split_of, layouts


def _write(blocks, stream_starts, split_of, layouts, ids, dtype, d, work: WorkDir) -> tuple[dict, int]:
    bounds = [layout.group_bounds() for layout in layouts]
    groups = sum(len(b) - 1 for b in bounds)
    starts = np.cumsum([0] + [len(b.meta["digests"]) for b in blocks])
    pieces = []
    for i, block in enumerate(blocks):
        lo, hi = starts[i], starts[i + 1]
        if lo == hi or not groups:
            continue  # nothing survived the filters in this block
        refs = stages.partition_block.options(num_returns=groups).remote(
            stream_starts[lo:hi], split_of[lo:hi], bounds, ids.eos, ids.bos, *[t for t, _ in block.parts])
        pieces.append([refs] if groups == 1 else refs)
    writes, offset = {}, 0
    for layout in layouts:
        writes[layout.split] = [stages.write_group.remote(layout, g, d.dir, str(work.shards_dir), dtype.name,
                                                          d.keep_doc_boundaries, *[p[offset + g] for p in pieces])
                                for g in range(len(layout.shard_groups))]
        offset += len(layout.shard_groups)
    every = [ref for refs in writes.values() for ref in refs]
    ray.wait(every, num_returns=len(every))  # on a failure, the other groups still finish and are kept
    done = {split: ray.get(refs) for split, refs in writes.items()}
    reused = sum(r for results in done.values() for _, r in results)
    return {split: [info for infos, _ in results for info in infos] for split, results in done.items()}, reused


def _run(cfg: Config, files: list[InputFile], fingerprint: str, given: Tokenizer | None, work: WorkDir) -> Manifest:
    d, data_dir, started, seconds = cfg.data, Path(cfg.data.dir), time.perf_counter(), {}
    blocks, tokenizer = _read_and_tokenize(files, d, given, work, seconds)
    ids, vocab = special_ids(tokenizer, d.tokenizer), vocab_size(tokenizer)
    dtype = token_dtype(vocab)
    tick = time.perf_counter()
    keep, exact_first = _deduplicate(blocks, d, _lsh_params(d))
    seconds["deduplicate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    per_shard = samples_per_shard(d.shard_mb, d.samples_per_shard,
                                  SampleLayout(d.seq_len + 1, dtype, d.keep_doc_boundaries))
    stream_starts, split_of, layouts = _plan(blocks, keep, d, per_shard, 1 + (ids.bos is not None))
    shards, reused_shards = _write(blocks, stream_starts, split_of, layouts, ids, dtype, d, work)
    seconds["pack_and_write"] = time.perf_counter() - tick
    tokenizer_path = data_dir / TOKENIZER_FILE
    if given is not None:
        write_atomic(tokenizer_path, Path(d.tokenizer.path).read_bytes())  # as given: the same sha256
    else:
        save_tokenizer(tokenizer, tokenizer_path)
    seconds["total"] = time.perf_counter() - started
    stats = _stats(files, blocks, keep, exact_first, split_of, layouts, shards, seconds, reused_shards)
    stats["pii"] = _pii_counts(blocks, keep, d.pii)
    stats["tokenizer"] = {"trained": given is None, "vocab_size": vocab, "sha256": file_sha256(tokenizer_path)}
    stats = json.loads(json.dumps(stats))  # plain JSON types, as it reads back from stats.json and the manifest
    write_atomic(data_dir / STATS_FILE, json.dumps(stats, indent=1) + "\n")
    manifest = Manifest(
        fingerprint=fingerprint, seq_len=d.seq_len, sample_len=d.seq_len + 1, dtype=dtype.name,
        tokenizer=TokenizerInfo(file=TOKENIZER_FILE, sha256=stats["tokenizer"]["sha256"], vocab_size=vocab,
                                eos_id=ids.eos, bos_id=ids.bos, pad_id=ids.pad),
        splits={split: SplitInfo(samples=sum(s.samples for s in shards[split]),
                                 tokens=sum(s.tokens for s in shards[split]), shards=shards[split])
                for split in SPLITS},
        stats=stats, inputs=[f.url for f in files], config=to_dict(cfg)["data"], doc_boundaries=d.keep_doc_boundaries)
    manifest.save(data_dir)  # last: a manifest means the directory is complete
    return manifest


def _stats(files, blocks, keep, exact_first, split_of, layouts, shards, seconds, reused_shards) -> dict:
    removed, removed_bytes = Counter(), Counter()
    for b in blocks:
        removed.update(b.meta["removed"])
        removed_bytes.update(b.meta["removed_bytes"])
    text_bytes = np.concatenate([b.meta["text_bytes"] for b in blocks])
    removed[EXACT_DUPLICATE], removed_bytes[EXACT_DUPLICATE] = int((~exact_first).sum()), int(text_bytes[~exact_first].sum())
    near = exact_first & ~keep
    removed[NEAR_DUPLICATE], removed_bytes[NEAR_DUPLICATE] = int(near.sum()), int(text_bytes[near].sum())
    units = sum(b.meta["units"] for b in blocks)
    tokens = {layout.split: layout.total_tokens for layout in layouts}
    kept_bytes = {split: int(text_bytes[keep & (split_of == s)].sum()) for s, split in enumerate(SPLITS)}
    return {
        "files": len(files), "input_bytes": sum(f.size for f in files), "read_tasks": len(blocks),
        "tokenize_tasks": sum(len(b.parts) for b in blocks), "documents_read": units,
        "removals": removal_table(units, removed, removed_bytes),
        "bad_files": [tuple(x) for b in blocks for x in b.meta["bad_files"]],
        "documents": {split: int((keep & (split_of == s)).sum()) for s, split in enumerate(SPLITS)},
        "tokens": tokens, "text_bytes": kept_bytes,
        "bytes_per_token": sum(kept_bytes.values()) / max(sum(tokens.values()), 1),
        "sample_len": layouts[0].sample_len,
        "samples": {layout.split: layout.num_samples for layout in layouts},
        "dropped_tokens": {layout.split: layout.dropped_tokens for layout in layouts},
        "dropped_fraction": sum(x.dropped_tokens for x in layouts) / max(sum(tokens.values()), 1),
        "shards": {split: len(infos) for split, infos in shards.items()},
        "shard_bytes": sum(info.bytes for infos in shards.values() for info in infos),
        "reused": {"blocks": sum(b.reused for b in blocks), "shards": reused_shards},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "tokens_per_second": sum(tokens.values()) / max(seconds["total"], 1e-9),
    }


def _pii_counts(blocks, keep, config) -> dict:
    """Per PII kind: matches replaced and documents with at least one, in the documents kept."""
    redactor = pii.Redactor.from_config(config)
    if redactor is None:
        return {}
    counts = np.concatenate([b.meta["pii"] for b in blocks])[keep]
    return {kind: {"replaced": int(counts[:, i].sum()), "documents": int((counts[:, i] > 0).sum())}
            for i, kind in enumerate(redactor.kinds)}


def _remove_stale_shards(data_dir: Path, manifest: Manifest) -> None:
    current = {shard.name for split in manifest.splits for shard in manifest.shards(split)}
    stale = [p for p in data_dir.iterdir() if _SHARD_FILE.fullmatch(p.name) and p.name not in current]
    for path in stale:
        path.unlink()
    if stale:
        log.info("preprocess: removed %d stale shard file(s) from an earlier run", len(stale))
