"""`distlm report RUN_DIR`: a run's summary from its metrics.jsonl, and a PNG of its loss and throughput."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from distlm.train.driver.progress import summarize
from distlm.train.worker.metrics import last_per_step, read_metrics


def starts(records: list[dict]) -> list[tuple[int, str]]:
    """Where each launch or restart began after step 0, and what changed: (step, label)."""
    marks, before = [], None
    for r in records:
        if "attempt" not in r:
            continue
        now = (r.get("workers"), r.get("layout"))
        if r["step"] > 0 and before is not None:
            what = "resume"
            if now[0] != before[0]:
                what = f"resume: {before[0]} -> {now[0]} workers"
            elif now[1] != before[1]:
                what = f"resume: {before[1]} -> {now[1]}"
            marks.append((r["step"], what))
        before = now
    return marks


def figure(run_dir: Path):
    """The report's figure: loss on a log scale with validation points, the late part of the curve zoomed in
    (where train against validation matters), the learning rate, the throughput; resumes marked on each, the
    final numbers written on it. A mixture's per-source validation losses join the zoomed panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = read_metrics(run_dir)
    train, val = last_per_step(records, "loss"), last_per_step(records, "val_loss")
    sources = sorted({k for r in records for k in r if k.startswith("val_loss/")})
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (ax_loss, ax_zoom), (ax_lr, ax_speed) = axes
    for ax, first in ((ax_loss, 0), (ax_zoom, train[len(train) // 3][0] if len(train) >= 3 else 0)):
        late = [(s, v) for s, v in train if s >= first]
        if late:
            ax.plot(*zip(*late), label="train", lw=1)
        late_val = [(s, v) for s, v in val if s >= first]
        if late_val:
            ax.plot(*zip(*late_val), "o", ms=5, label="validation")
        for name in sources if ax is ax_zoom else ():
            points = [(s, v) for s, v in last_per_step(records, name) if s >= first]
            if points:
                ax.plot(*zip(*points), "s", ms=4, label=f"validation: {name.split('/', 1)[1]}")
        if ax is ax_zoom and len(late) > 20:   # the noisy per-step loss, and its trend
            window = max(5, len(late) // 20)
            mean = [sum(v for _, v in late[i - window: i]) / window for i in range(window, len(late) + 1)]
            ax.plot([s for s, _ in late[window - 1:]], mean, lw=2, color="tab:blue", label=f"train, mean of {window}")
        if ax is ax_zoom and late:
            values = [v for line in ax.lines for v in line.get_ydata()]
            pad = 0.05 * (max(values) - min(values) or 1)
            ax.set_ylim(min(values) - pad, max(values) + pad)
    ax_loss.set_yscale("log")
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())   # 4, 6, not 4 x 10^0
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token, log scale)", title=f"loss: {run_dir.name}")
    ax_zoom.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="the last two thirds, zoomed")
    lr = last_per_step(records, "lr")
    if lr:
        ax_lr.plot(*zip(*lr), lw=1, color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    speed = last_per_step(records, "tokens_per_s")
    if speed:
        ax_speed.plot(*zip(*speed), lw=1, color="tab:purple")
    ax_speed.set(xlabel="step", ylabel="tokens/s", title="throughput")
    for step, what in starts(records):
        for ax in axes.flat:
            ax.axvline(step, color="gray", ls="--", lw=1)
        for ax in (ax_loss, ax_speed):
            ax.annotate(f" {what}", (step, 0.97), xycoords=("data", "axes fraction"), va="top", fontsize=8,
                        color="dimgray")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (ax_loss, ax_zoom):
        if ax.lines:
            ax.legend(fontsize=8)
    final = []
    if train:
        final.append(f"step {train[-1][0]}: train loss {train[-1][1]:.3f}")
    if val:
        final.append(f"val loss {val[-1][1]:.3f} (perplexity {math.exp(min(val[-1][1], 50)):.1f}) at step {val[-1][0]}")
    fig.suptitle("   ".join(final) or run_dir.name, fontsize=10)
    fig.tight_layout()
    return fig


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(run_dir)
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
