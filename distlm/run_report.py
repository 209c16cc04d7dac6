"""`distlm report RUN_DIR`: a run's summary from its metrics.jsonl, and a PNG of its loss and throughput."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from distlm.train.driver.progress import summarize
from distlm.train.worker.metrics import last_per_step, read_metrics


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train, val = last_per_step(records, "loss"), last_per_step(records, "val_loss")
    speed = last_per_step(records, "tokens_per_s")
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train", lw=1)
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"loss: {run_dir.name}")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if speed:
        ax_speed.plot(*zip(*speed), lw=1)
    ax_speed.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="distlm report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a training run's directory (run_dir in the config)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    s = summarize(run_dir)
    png = plot(run_dir, args.plot or run_dir / "loss.png")
    print(f"run            {run_dir}")
    print(f"steps          {s['steps']}   tokens seen {s['tokens_seen']:,}   median {s['tokens_per_s']:,.0f} tokens/s, "
          f"{s['step_seconds']:.2f} s/step")
    print(f"train loss     {s['first_train_loss']:.3f} -> {s['final_train_loss']:.3f} (mean of the last 10 steps)")
    print(f"val loss       {s['first_val_loss']:.3f} -> {s['final_val_loss']:.3f}   (perplexity {s['final_val_ppl']:.1f})")
    mfu = "n/a (unknown device peak; set logger.peak_tflops)" if math.isnan(s["mfu"]) else f"{s['mfu']:.1%}"
    print(f"efficiency     MFU {mfu}   data-loader wait {s['data_wait_share']:.1%} of step time   "
          f"peak {s['memory_kind']} memory {s['peak_memory_gib']:.2f} GiB")
    print(f"checkpoints    median save {s['checkpoint_seconds']:.1f} s   skipped steps {s['skipped_steps']}")
    print(f"checkpoint     {s['checkpoint']}")
    print(f"HF export      {s['hf_export']}")
    print(f"metrics        {s['metrics']}")
    print(f"wandb          {s['wandb']}  (offline runs upload with `wandb sync {run_dir}/wandb/offline-run-*`)")
    print(f"plot           {png}")
    for sample in s["last_samples"]:
        print(f"sample @{sample['step']:<6} {sample['prompt']!r} -> {sample['continuation']!r}")
