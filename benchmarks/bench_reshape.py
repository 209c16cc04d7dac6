"""Reshape at scale: a TP2 x PP2 checkpoint of a >= 150M-parameter model resumed at DP2 through its universal
form, made by distlm's path (DeepSpeed's converter on Ray tasks before any training rank starts), against the
baseline of DeepSpeed's converter in one process (what rank 0 did inside Trainer.__init__ while every other
rank waited in a collective).

    python benchmarks/bench_reshape.py [--layers 16 --vocab 32000 --dir build/bench_reshape --cpus 2]

1. 4 real gloo ranks train 1 step at TP2 x PP2 (ZeRO-1, fp32) and save the checkpoint.
2. Baseline: `universal.convert(tag_dir)` in one fresh process: wall time, its peak RSS.
3. distlm's path: `resume.plan_resume` at DP2 says "universal"; `resume.prepare(plan)` converts on Ray tasks
   (each task a fresh process that reports its peak RSS); the driver's RSS is sampled meanwhile.
4. 2 gloo ranks at DP2 start after it, load the universal form and train 1 step: their start time is
   printed against the conversion's end (no training rank exists, so none waits, during the conversion).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import ray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # distributed.run_ranks: N gloo ranks as local processes

from distlm.checkpoint import store, universal  # noqa: E402
from distlm.config import compose_config  # noqa: E402
from distlm.data.shards import Manifest  # noqa: E402
from distlm.train import resume
from distlm.train.worker.metrics import read_metrics  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)  # model=125m's blocks (dim 768, ffn 2048), 16 of them
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", default=str(REPO / "build" / "bench_reshape"))
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    return p.parse_args()


def config(a: argparse.Namespace, data_dir: Path, layout: list[str], steps: int):
    return compose_config(
        "model=125m", f"model.n_layers={a.layers}", f"model.vocab_size={a.vocab}", "data.seq_len=64",
        "data.tokenizer.vocab_size=512", f"data.dir={data_dir}", f"run_dir={Path(a.dir) / 'run'}",
        f"trainer.max_steps={steps}", "optimizer.warmup_steps=1", "trainer.eval_batches=1", "trainer.eval_every=100",
        "logger.wandb=false", "logger.samples=0", *layout)


def make_shards(root: Path) -> Path:
    from distlm.data.preprocess.pipeline import preprocess

    corpus = root / "kjv.jsonl"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_corpus.py"), str(corpus)], check=True,
                   capture_output=True)
    lines = corpus.read_text(encoding="utf-8").splitlines()[:100]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={root / 'shards'}", "data.seq_len=64",
                              "data.tokenizer.vocab_size=512", "data.samples_per_shard=256"))
    return root / "shards"


def _fit(rank: int, c, plan, started: Path) -> None:
    from distlm.train.worker.trainer import Trainer

    (started / f"rank{rank}").write_text(repr(time.time()))  # the process group exists from here on
    trainer = Trainer(c, plan)
    trainer.fit()


def train(c, started: Path) -> None:
    from distributed import run_ranks

    plan = resume.plan_resume(c, Manifest.load(c.data.dir).tokenizer_sha256)
    started.mkdir(parents=True, exist_ok=True)
    run_ranks(_fit, c.cluster.num_workers, c, plan, started)


def baseline(tag_dir: Path) -> tuple[float, float]:
    """DeepSpeed's converter in one fresh process, as rank 0 ran it: (seconds, peak RSS MiB)."""
    code = ("import resource, sys, time; from distlm.train import universal; t = time.perf_counter(); "
            "universal.convert(sys.argv[1]); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(tag_dir)], check=True, capture_output=True, text=True)
    seconds, rss = out.stdout.split()[-2:]
    return float(seconds), float(rss)


def sample_rss(stop: threading.Event, peak: list[float]) -> None:
    me = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], me.memory_info().rss / 2**20)
        time.sleep(0.05)


def main() -> None:
    a = parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False)
    data_dir = make_shards(root)
    written = config(a, data_dir, ["parallel=tp2_pp2", "cluster.num_workers=4", "trainer.micro_batch_size=1",
                                   "trainer.grad_accum=2"], steps=1)
    start = time.perf_counter()
    train(written, root / "started_tp2_pp2")
    tag_dir = Path(written.run_dir) / "checkpoints" / store.tag_for_step(1)
    state = store.read_state(tag_dir)
    size = sum(p.stat().st_size for p in tag_dir.iterdir() if p.is_file())
    import torch

    from distlm.model.llama import Llama

    with torch.device("meta"):
        params = Llama(written.model).num_params()
    print(f"checkpoint: {params / 1e6:.1f}M parameters, tp 2 x pp 2 x dp 1, ZeRO-1, fp32, step {state.step}: "
          f"{size / 2**30:.2f} GiB in {tag_dir} (written in {time.perf_counter() - start:.0f}s)")

    base_s, base_rss = baseline(tag_dir)
    shutil.rmtree(tag_dir / universal.UNIVERSAL_DIR)
    print(f"baseline  one process (DeepSpeed's converter, as rank 0 ran it): {base_s:6.1f}s, peak RSS {base_rss:,.0f} MiB")

    dp2 = config(a, data_dir, ["parallel=dp", "cluster.num_workers=2", "trainer.micro_batch_size=1"], steps=2)
    plan = resume.plan_resume(dp2, Manifest.load(data_dir).tokenizer_sha256)
    assert plan.kind is resume.ResumeKind.universal, plan
    me = psutil.Process()
    before, peak, stop = me.memory_info().rss / 2**20, [0.0], threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    resume.prepare(plan)
    seconds, ended = time.perf_counter() - start, time.time()
    stop.set()
    sampler.join()
    record = json.loads((tag_dir / universal.UNIVERSAL_DIR / universal.COMPLETE_FILE).read_text())
    task_rss = [rss for phase in record["tasks"] for rss in phase["peak_rss_mib"]]
    phases = ", ".join(f"{name} {p['items']} items on {p['tasks']} tasks (peak RSS "
                       f"{'/'.join(f'{r:,.0f}' for r in p['peak_rss_mib'])} MiB)"
                       for name, p in zip(("extract", "merge"), record["tasks"]))
    print(f"distlm    Ray tasks before the training ranks start:            {seconds:6.1f}s wall; {phases}; "
          f"converter task {record['converter_peak_rss_mib']:,.0f} MiB; driver RSS {before:,.0f} -> peak "
          f"{peak[0]:,.0f} MiB")
    largest = max([*task_rss, record["converter_peak_rss_mib"]])
    print(f"ratios    wall {seconds / base_s:.2f}x the baseline; largest process {largest / base_rss:.2f}x the "
          f"baseline's peak RSS (on {a.cpus} CPUs shared with other jobs)")

    started = root / "started_dp2"
    train(dp2, started)  # the universal form loaded at dp 2, one more step
    first = min(float(p.read_text()) for p in started.iterdir())
    loss = {r["step"]: r["loss"] for r in read_metrics(Path(dp2.run_dir)) if "loss" in r}
    print(f"dp 2      its ranks started {first - ended:.1f}s after the conversion ended: no training rank "
          f"existed, so none waited in a collective, while it ran; from the universal form they trained step "
          f"{max(loss)} (loss {loss[max(loss)]:.4f}; step 1 at tp 2 x pp 2: {loss[1]:.4f})")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
