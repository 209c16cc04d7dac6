"""Preprocessing throughput against its practical limit, measured in one run.

    python benchmarks/bench_preprocess.py [--mb 40] [--workers 1 2] [--repeats 3] [--seq-len 1024]
        [--corpus many few-long] [--task-mb 1 1000] [--with-ray-start] [--megatron PATH [--megatron-pythonpath DIR ...]]
        [--skip-in-process]

(a) raw: `tokenizers` encode_batch_fast over the same texts, already in memory, on all cores: what
    tokenization alone costs, the bound for any pipeline that tokenizes;
(b) pipeline: `distlm preprocess` end to end (read JSONL, clean, filter, exact + near dedup, tokenize, mix,
    pack, write and hash shards) on a local Ray cluster of N worker CPUs, with the same tokenizer given
    (training one is timed apart, once).
    Each data.tokenize_task_mb in --task-mb is run (1000 = one task per read block, as the old split by
    document count gave for a file of few documents);
(c) with --with-ray-start: the whole `distlm preprocess` command as a user runs it (a new process: Python
    start-up, imports, Hydra, Ray start-up and shutdown included; its CPU time is that of its whole process
    tree), and the same command joining a running cluster (cluster.address), against (a), interleaved;
(d) with --megatron PATH: Megatron-LM's tools/preprocess_data.py from a checkout at PATH (--workers 2, the
    same texts in one JSONL, the same tokenizer.json as an HF tokenizer directory, --append-eod), against (c)
    in the same run. --megatron-pythonpath adds what its imports need (e.g. `pip install --target DIR
    triton`, and on Python 3.11 a sitecustomize.py that sets typing.override from typing_extensions).
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
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

# Ray reads these when imported: a token of this run's own, known to the cluster that (c') starts and to the
# command that joins it (and to nothing else on the machine).
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
import ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_corpus import chapters, kjv_verses_file  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.data.preprocess.pipeline import preprocess  # noqa: E402
from distlm.data.preprocess.tokenizer import train_tokenizer  # noqa: E402

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


def process_tree_run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a command; CPU: all this process's descendants during the run (the command,
    its own children, and the running cluster's processes that work for it), polled every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu: dict = {}
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()))
    reader.start()
    before = _descendant_cpu()   # this process's descendants: the command's tree, and a running cluster's processes
    while proc.poll() is None:
        cpu.update(_descendant_cpu())
        time.sleep(0.05)
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {errors[0][-3000:].decode(errors='replace')}")
    return wall, sum(cpu.values()) - sum(before.get(k, 0.0) for k in cpu)


def _descendant_cpu() -> dict:
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            found[(p.pid, p.create_time())] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return found


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
    parser.add_argument("--megatron", type=Path, help="a Megatron-LM checkout: also run its tools/preprocess_data.py")
    parser.add_argument("--megatron-pythonpath", nargs="*", default=[], help="extra PYTHONPATH entries for Megatron")
    parser.add_argument("--megatron-workers", type=int, default=2)
    parser.add_argument("--skip-in-process", action="store_true", help="only (c) and (d), not the in-process (b)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        for kind in args.corpus:
            run(args, root / kind, kind)
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
    for workers, task_mb in [] if args.skip_in_process else [(w, t) for w in args.workers for t in args.task_mb]:
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
    if results:
        report(results)
    if args.with_ray_start or args.megatron:
        command_runs(args, root, texts, tokenizer)


def command_runs(args, root: Path, texts: list[str], tokenizer) -> None:
    """(c) and (d), interleaved: raw, the command starting its own Ray, the command joining a running cluster,
    Megatron; medians of the per-repeat ratios."""
    command = [sys.executable, "-m", "distlm.cli", "preprocess", f"data.inputs=[{root / 'in'}/*.jsonl]",
               f"data.dir={root / 'out'}", f"data.tokenizer.path={root / 'tokenizer.json'}", f"data.seq_len={args.seq_len}",
               "data.shard_mb=64", "data.val_fraction=0.01", f"data.tokenize_task_mb={args.task_mb[0]}",
               f"hydra.run.dir={root / 'hydra'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    cluster = ray.init(address="local", num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = cluster.address_info["gcs_address"]   # (c'): the same command joining this running cluster
    runs: dict[str, list] = {"raw": [], "command": [], "command, cluster running": [], "megatron": []}
    try:
        for repeat in range(args.repeats):
            runs["raw"].append(raw_run(tokenizer, texts))
            if args.with_ray_start:
                runs["command"].append(_command_run(command, env, root))
                runs["command, cluster running"].append(_command_run(command + [f"cluster.address={address}"], env, root))
            if args.megatron:
                runs["megatron"].append(megatron_run(args, root, texts))
            print(f"  repeat {repeat + 1}: " + "; ".join(
                f"{name} {r[-1]['tokens_per_s']:,.0f} tok/s, {r[-1]['tokens_per_cpu_s']:,.0f} tok/CPU-s"
                + (f" ({r[-1]['seconds']:.1f}s, preprocessing {r[-1]['pipeline_s']:.1f}s)" if "pipeline_s" in r[-1] else "")
                for name, r in runs.items() if r), flush=True)
    finally:
        ray.shutdown()
    med = lambda xs: sorted(xs)[len(xs) // 2]   # noqa: E731
    print(f"\nmedians of {args.repeats} interleaved repeats (each ratio is taken within a repeat):")
    for name, r in runs.items():
        if r and name != "raw":
            print(f"  {name:>26}: {med([x['tokens_per_s'] for x in r]):>10,.0f} tok/s = "
                  f"{med([x['tokens_per_s'] / y['tokens_per_s'] for x, y in zip(r, runs['raw'])]):.2f}x raw; "
                  f"{med([x['tokens_per_cpu_s'] for x in r]):>10,.0f} tok/CPU-s = "
                  f"{med([x['tokens_per_cpu_s'] / y['tokens_per_cpu_s'] for x, y in zip(r, runs['raw'])]):.2f}x raw"
                  + (f"; fixed cost (wall - preprocessing) {med([x['seconds'] - x['pipeline_s'] for x in r]):.1f}s"
                     if "pipeline_s" in r[0] else ""))
    print(f"  {'raw':>26}: {med([x['tokens_per_s'] for x in runs['raw']]):>10,.0f} tok/s, "
          f"{med([x['tokens_per_cpu_s'] for x in runs['raw']]):,.0f} tok/CPU-s")
    for name in ("command", "command, cluster running"):
        if runs[name] and runs["megatron"]:
            ratio = med([x["tokens_per_s"] / m["tokens_per_s"] for x, m in zip(runs[name], runs["megatron"])])
            cpu = med([x["tokens_per_cpu_s"] / m["tokens_per_cpu_s"] for x, m in zip(runs[name], runs["megatron"])])
            print(f"  {name} / megatron ({args.megatron_workers} workers): {ratio:.2f}x tok/s, {cpu:.2f}x tok/CPU-s")


def _command_run(command: list[str], env: dict, root: Path) -> dict:
    shutil.rmtree(root / "out", ignore_errors=True)
    seconds, cpu = process_tree_run(command, env)
    stats = json.loads((root / "out" / "stats.json").read_text())
    tokens = sum(stats["tokens"].values())
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu,
            "pipeline_s": stats["seconds"]["total"]}


def megatron_run(args, root: Path, texts: list[str]) -> dict:
    """Megatron-LM's preprocess_data.py on the same texts (one JSONL) with the same tokenizer, EOD appended."""
    source, tok_dir, out = root / "megatron_in.jsonl", root / "megatron_tokenizer", root / "megatron_out"
    if not source.exists():
        with open(source, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        tok_dir.mkdir()
        shutil.copy(root / "tokenizer.json", tok_dir / "tokenizer.json")   # its HF tokenizer needs the EOS named:
        (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                   "eos_token": "<|endoftext|>"}))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, args.megatron_pythonpath), str(args.megatron)])}
    cmd = [sys.executable, str(args.megatron / "tools" / "preprocess_data.py"), "--input", str(source),
           "--output-prefix", str(out / "corpus"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
           str(tok_dir), "--workers", str(args.megatron_workers), "--append-eod", "--log-interval", "1000000"]
    seconds, cpu = process_tree_run(cmd, env)
    (bin_file,) = out.glob("*.bin")
    tokens = bin_file.stat().st_size // (2 if args.vocab < 65500 else 4)   # its dtype: uint16 below 65,500 tokens
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu}


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
