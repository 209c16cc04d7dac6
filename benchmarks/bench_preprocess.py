"""Preprocessing throughput against its practical limit, measured in one run.

    python benchmarks/bench_preprocess.py [--mb 40] [--workers 1 2] [--repeats 3] [--seq-len 1024]
        [--corpus many few-long] [--task-mb 1 1000] [--with-ray-start]

(a) raw: `tokenizers` encode_batch_fast over the same texts, already in memory, on all cores: what
    tokenization alone costs, the bound for any pipeline that tokenizes;
(b) pipeline: `distlm preprocess` end to end (read JSONL, clean, filter, exact + near dedup, tokenize, mix,
    pack, write and hash shards) on a local Ray cluster of N worker CPUs, with the same tokenizer given
    (training one is timed apart, once).
    Each data.tokenize_task_mb in --task-mb is run (1000 = one task per read block, as the old split by
    document count gave for a file of few documents);
(c) with --with-ray-start: the whole command as a user runs it, Ray start-up included (preprocess starts a
    local cluster of all cores itself and stops it), against (a) in the same run.
Prints tokens/s of both, their ratio, and how the pipeline scales with workers. (a) and (b) alternate and
repeat: on a shared machine the best of several runs is the least disturbed measurement. Both are also
measured in tokens per CPU-second (this process and every Ray process it started), which other jobs on
the machine disturb much less than wall-clock time: the CPU ratio is what the wall-clock ratio becomes on
an idle machine if the pipeline keeps every core busy.

The corpus is synthetic but real text: `many` = documents of 40 random King James verses (≈4 KB, distinct,
so deduplication keeps nearly all of them) in 4 JSONL files; `few-long` = documents of 2,000 verses (≈250 KB)
in one JSONL file (one read task: only the tokenize split can spread it over the cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_corpus import chapters, kjv_verses_file  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.data.preprocess import preprocess  # noqa: E402
from distlm.data.tokenizer import train_tokenizer  # noqa: E402


CORPORA = {"many": (40, 4), "few-long": (2000, 1)}   # verses per document, JSONL files


def make_corpus(out_dir: Path, megabytes: float, kind: str) -> list[str]:
    verses_per_doc, files = CORPORA[kind]
    verses = [v for doc in chapters(kjv_verses_file()) for v in doc["text"].split("\n")]
    rng = random.Random(0)
    texts, size = [], 0
    while size < megabytes * 2**20:
        texts.append("\n".join(rng.sample(verses, verses_per_doc)))
        size += len(texts[-1].encode())
    for i in range(files):
        with open(out_dir / f"part-{i}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i::files])
    return texts


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants (Ray's raylet, GCS and workers) so far."""
    total = sum(psutil.Process().cpu_times()[:2])
    for child in psutil.Process().children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def raw_run(tokenizer, texts: list[str]) -> dict:
    cpu, start = cpu_seconds(), time.perf_counter()
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(len(e.ids) for e in encodings)
    return {"tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu}


def pipeline_run(inputs: Path, out: Path, tokenizer: Path, seq_len: int, task_mb: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose_config(f"data.inputs=[{inputs}/*.jsonl]", f"data.dir={out}", f"data.tokenizer.path={tokenizer}",
                         f"data.seq_len={seq_len}", "data.shard_mb=64", "data.val_fraction=0.01",
                         f"data.tokenize_task_mb={task_mb}")
    cpu, start = cpu_seconds(), time.perf_counter()
    manifest = preprocess(cfg)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    tokens = sum(manifest.stats["tokens"].values())
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu,
            "stats": manifest.stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray CPUs to try")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--corpus", nargs="+", default=["many", "few-long"], choices=list(CORPORA))
    parser.add_argument("--task-mb", type=float, nargs="+", default=[1.0], help="data.tokenize_task_mb values to try")
    parser.add_argument("--with-ray-start", action="store_true", help="also time the command with Ray start-up")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        for kind in args.corpus:
            run(args, root / kind, kind)
        if args.with_ray_start:
            ray_start_runs(args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path, kind: str) -> None:
    (root / "in").mkdir(parents=True)
    texts = make_corpus(root / "in", args.mb, kind)
    text_mb = sum(len(t.encode()) for t in texts) / 2**20
    print(f"\ncorpus {kind}: {len(texts):,} documents, {text_mb:.1f} MB of text in {CORPORA[kind][1]} JSONL file(s)")
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts[:5000], args.vocab, ["<|endoftext|>"])
    print(f"training a {args.vocab}-token BPE on 5,000 documents: {time.perf_counter() - start:.1f}s (not in (b))")
    tokenizer.save(str(root / "tokenizer.json"))

    results = {}
    for workers, task_mb in [(w, t) for w in args.workers for t in args.task_mb]:
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        raw, pipe = [], []
        for repeat in range(args.repeats):
            raw.append(raw_run(tokenizer, texts))
            pipe.append(pipeline_run(root / "in", root / "out", root / "tokenizer.json", args.seq_len, task_mb))
            print(f"  workers={workers} task_mb={task_mb:g} run {repeat + 1}: raw {raw[-1]['tokens_per_s']:,.0f} "
                  f"tok/s, pipeline {pipe[-1]['tokens_per_s']:,.0f} tok/s ({pipe[-1]['seconds']:.1f}s, "
                  f"{pipe[-1]['stats']['tokenize_tasks']} tokenize tasks)", flush=True)
        ray.shutdown()
        best = max(pipe, key=lambda r: r["tokens_per_s"])
        results[f"{workers}/{task_mb:g}"] = {"raw": max(r["tokens_per_s"] for r in raw), "pipeline": best["tokens_per_s"],
                            "raw_cpu": max(r["tokens_per_cpu_s"] for r in raw),
                            "pipeline_cpu": max(r["tokens_per_cpu_s"] for r in pipe),
                            "ray_start": ray_start, "seconds": best["stats"]["seconds"],
                            "paired": sorted(p["tokens_per_s"] / r["tokens_per_s"] for r, p in zip(raw, pipe))}
    report(results)
    if args.with_ray_start:
        command_runs(args, root, texts, tokenizer)


def ray_start_runs(repeats: int) -> None:
    """Seconds a local Ray start + stop takes with and without its dashboard (the command starts it without)."""
    times = {True: [], False: []}
    for _ in range(repeats):
        for dashboard in times:
            start = time.perf_counter()
            ray.init(address="local", num_cpus=psutil.cpu_count(), include_dashboard=dashboard, log_to_driver=False)
            ray.shutdown()
            times[dashboard].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"Ray start + stop, median of {repeats}: with dashboard {med[True]:.1f}s, without {med[False]:.1f}s")


def command_runs(args, root: Path, texts: list[str], tokenizer) -> None:
    """(c): preprocess with no Ray running, as `distlm preprocess` runs it: it starts and stops its cluster."""
    ratios = []
    for repeat in range(args.repeats):
        raw = raw_run(tokenizer, texts)
        pipe = pipeline_run(root / "in", root / "out", root / "tokenizer.json", args.seq_len, args.task_mb[0])
        ratios.append(pipe["tokens_per_s"] / raw["tokens_per_s"])
        print(f"  command incl. Ray start run {repeat + 1}: raw {raw['tokens_per_s']:,.0f} tok/s, command "
              f"{pipe['tokens_per_s']:,.0f} tok/s ({pipe['seconds']:.1f}s, of which preprocessing "
              f"{pipe['stats']['seconds']['total']:.1f}s), ratio {ratios[-1]:.2f}", flush=True)
    print(f"command incl. Ray start / raw, median of {len(ratios)}: {sorted(ratios)[len(ratios) // 2]:.2f}")


def report(results: dict) -> None:
    print(f"\n{'workers/task_mb':>15} | {'raw tok/s':>10} | {'pipeline tok/s':>14} | {'ratio':>5} | "
          f"{'raw tok/CPU-s':>13} | {'pipeline tok/CPU-s':>18} | {'CPU ratio':>9} | pipeline stages (s)")
    for workers, r in results.items():
        stages = ", ".join(f"{k}={v:.1f}" for k, v in r["seconds"].items())
        print(f"{workers:>15} | {r['raw']:>10,.0f} | {r['pipeline']:>14,.0f} | {r['pipeline'] / r['raw']:>5.2f} | "
              f"{r['raw_cpu']:>13,.0f} | {r['pipeline_cpu']:>18,.0f} | {r['pipeline_cpu'] / r['raw_cpu']:>9.2f} | {stages}")
    print("median of the per-run ratios (each pipeline run over the raw run just before it): " + ", ".join(
        f"{k} {r['paired'][len(r['paired']) // 2]:.2f}" for k, r in results.items()))
    print("(Ray start-up, not counted above: " + ", ".join(f"{w} workers {r['ray_start']:.1f}s"
                                                          for w, r in results.items()) + ")")


if __name__ == "__main__":
    main()
