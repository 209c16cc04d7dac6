"""What preprocessing did, in numbers: the progress bar while it runs, stats.json and the summary after.

stats.json (also inside manifest.json) holds documents in/out of every stage, the documents and bytes each
filter and each kind of bad input removed, duplicates removed, tokens, dropped tokens, bytes per token,
shards, time per stage and throughput, and the personal data (PII) replaced per kind.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from tqdm import tqdm

from distlm.data.preprocess.clean import FILTER_REASONS
from distlm.data.preprocess.sources import FILE_REASONS, READ_REASONS

log = logging.getLogger("distlm.data.preprocess.pipeline")

EXACT_DUPLICATE, NEAR_DUPLICATE = "exact_duplicate", "near_duplicate"
# Every way a document is lost, in pipeline order (TOO_LONG also covers raw lines too long to parse).
REMOVAL_STAGES = (*FILE_REASONS, *READ_REASONS, *FILTER_REASONS, EXACT_DUPLICATE, NEAR_DUPLICATE)


class Progress:
    """One tqdm bar over the input bytes, advanced as tokenize tasks finish, showing docs/s, MB/s, tokens/s."""

    def __init__(self, total_bytes: int, desc: str = "preprocess"):
        self.total = round(total_bytes / 2**20, 2)
        self.bar = tqdm(total=self.total, unit="MB", desc=desc, mininterval=0.5,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}{postfix}]")
        self.started = time.perf_counter()
        self.mb = 0.0
        self.docs = self.tokens = 0

    def advance(self, input_bytes: float, docs: int, tokens: int) -> None:
        self.mb += input_bytes / 2**20
        self.docs += docs
        self.tokens += tokens
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / seconds:,.0f} docs/s, {self.mb / seconds:.2f} MB/s, "
                                 f"{self.tokens / seconds:,.0f} tok/s", refresh=False)
        self.bar.n = min(round(self.mb, 2), self.total)   # set, not added: no float drift past the total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def removal_table(units: int, removed: Counter, removed_bytes: Counter) -> list[dict]:
    """Documents in, removed (docs and bytes) and out of every removal stage, in pipeline order."""
    rows, remaining = [], units
    for stage in REMOVAL_STAGES:
        if stage in FILE_REASONS:  # whole files: counted in files and bytes, not documents
            rows.append({"stage": stage, "files": removed[stage], "bytes": removed_bytes[stage]})
            continue
        rows.append({"stage": stage, "docs_in": remaining, "docs_removed": removed[stage],
                     "bytes_removed": removed_bytes[stage], "docs_out": remaining - removed[stage]})
        remaining -= removed[stage]
    return rows


def summary_lines(stats: dict) -> list[str]:
    s = stats
    lines = [f"read {s['documents_read']:,} documents, {s['input_bytes'] / 2**20:,.1f} MB from {s['files']} file(s) "
             f"in {s['read_tasks']} read and {s['tokenize_tasks']} tokenize task(s)"]
    for row in s["removals"]:
        if "files" in row:
            if row["files"]:
                lines.append(f"  skipped {row['stage']:<16} {row['files']:>7,} files {row['bytes'] / 2**20:10,.2f} MB")
        else:
            lines.append(f"  {row['stage']:<24} in {row['docs_in']:>9,}  removed {row['docs_removed']:>8,} docs "
                         f"{row['bytes_removed'] / 2**20:9,.2f} MB  out {row['docs_out']:>9,}")
    for reason, url in s["bad_files"][:10]:
        lines.append(f"  {reason}: {url}")
    if s["pii"]:
        lines.append("PII replaced in the kept documents: " + ", ".join(
            f"{kind} {c['replaced']:,} in {c['documents']:,} docs" for kind, c in s["pii"].items()))
    else:
        lines.append("PII redaction off (data.pii.enabled=false)")
    tok = s["tokens"]
    lines += [
        f"documents train={s['documents']['train']:,} val={s['documents']['val']:,}; "
        f"tokens train={tok['train']:,} val={tok['val']:,} (with special tokens), "
        f"{s['bytes_per_token']:.2f} text bytes/token",
        f"samples train={s['samples']['train']:,} val={s['samples']['val']:,} of {s['sample_len']} tokens; dropped at "
        f"the end of each stream {sum(s['dropped_tokens'].values()):,} tokens ({100 * s['dropped_fraction']:.4f}%)",
        f"shards train={s['shards']['train']} val={s['shards']['val']}, {s['shard_bytes'] / 2**20:,.1f} MB; "
        f"reused from an interrupted run: {s['reused']['blocks']} block(s), {s['reused']['shards']} shard(s)",
        f"tokenizer vocab={s['tokenizer']['vocab_size']:,} {'trained' if s['tokenizer']['trained'] else 'given'} "
        f"sha256={s['tokenizer']['sha256'][:12]}",
        "seconds " + ", ".join(f"{k}={v:.1f}" for k, v in s["seconds"].items())
        + f"; {s['tokens_per_second']:,.0f} tokens/s",
    ]
    return lines


def log_summary(stats: dict, where: str) -> None:
    for line in summary_lines(stats):
        log.info("preprocess: %s", line)
    log.info("preprocess: stats saved in %s", where)
    if stats["samples"]["train"] == 0:
        log.warning("preprocess: no training samples: check data.inputs, data.text_field and the removals above")
