"""Training memory: each rank's peak RSS during training steps, above a bare process of the same layout, against
what `distlm plan` predicts for that rank (distlm/plan.py), phase by phase.

    python benchmarks/bench_train_memory.py      # 1, 2, 4, 8 ranks at 378 M parameters (~22 min, <= 14 GiB)
    python benchmarks/bench_train_memory.py --layers 12 --layouts zero3_dp2 zero1_dp2   # 124 M, ~3 min
    python benchmarks/bench_train_memory.py --layouts zero2_dp2 --layers 12 --set trainer.precision=bf16

Model: the 125m width (dim 768, 12 heads, ffn 2048) with --layers blocks and the GPT-2 vocabulary tied (48 blocks:
378.4 M parameters), micro-batch 1 x 128 tokens; the pipeline runs 4 micro-batches per step.

Method (tests/rank_memory.py): every rank is a fresh spawned process on gloo, 1 torch thread, that sets
glibc's mmap threshold as a training worker does (cluster.malloc_mmap_threshold_kb). The bare run imports
everything, creates the process groups and builds nothing; its peak is getrusage's. In the built run the kernel's
high-water mark (VmHWM) is reset (/proc/self/clear_refs) at the start of each phase and read at its end: forward,
backward, optimizer step (a pipeline's train_batch is one phase). "measured" = the highest phase of the steps
minus the bare process's peak; "planned" = the planner's peak for that rank (its pipeline stage), without the
allowance (cluster.host_overhead_gb) that stands for the bare process. The first step has no Adam moments yet: the
steady state starts at step 2, which is why at least 2 steps run. A watchdog kills the ranks it started if their
summed RSS passes --rss-limit-gb.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from rank_memory import measure_training  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.plan import GiB, plan, stage_params, total_params  # noqa: E402

MiB = 2**20
LAYOUTS = {  # name: (world size, overrides)
    "zero1_dp2": (2, ["parallel=dp"]),
    "tp2_pp4": (8, ["parallel=tp2_pp2", "parallel.pp=4", "parallel.activation_checkpoint_interval=0",
                    "trainer.grad_accum=4"]),
    "zero3_dp8": (8, ["parallel=zero3"]),
    # other layouts and world sizes, for --layouts
    "zero1_dp1": (1, ["parallel=dp"]),
    "zero0_dp2": (2, ["parallel=dp", "parallel.zero_stage=0"]),
    "zero2_dp2": (2, ["parallel=dp", "parallel.zero_stage=2"]),
    "zero3_dp2": (2, ["parallel=zero3"]),
    "zero3_dp4": (4, ["parallel=zero3"]),
    "pp2_dp1": (2, ["parallel=pp2", "trainer.grad_accum=4"]),
    "tp2_dp1": (2, ["parallel=tp2"]),
}
DEFAULT_LAYOUTS = ["zero1_dp1", "zero1_dp2", "zero3_dp2", "zero3_dp4", "tp2_pp4", "zero3_dp8"]  # the 3 and more


def compare(name: str, base: list[str], extra: list[str], steps: int, limit_gib: float) -> list[dict]:
    """The layout's ranks measured (tests/rank_memory.py), each beside the planner's peak for its pipeline stage."""
    world, overrides = LAYOUTS[name]
    c = compose_config(*base, f"cluster.num_workers={world}", *overrides, *extra)
    planned = plan(c)
    rows = measure_training(c, steps, limit_gib)
    for row in rows:
        memory = planned.training[row["stage"]]
        n = stage_params(c.model, c.parallel.tp, c.parallel.pp)[row["stage"]]
        row.update(layout=name, elements=n / (c.data_parallel_size * c.parallel.cp) if c.parallel.zero_stage == 3
                   else n, planned_mb=memory.peak / MiB, planned_phase=memory.peak_phase,
                   planned_phases_mb={k: memory.total(k) / MiB for k in memory.phases}, plan_fits=planned.fits,
                   planned_run_mb=(planned.host_per_stage[row["stage"]] - planned.host_overhead) / MiB,
                   plan_host_per_node_gib=planned.host_per_node / GiB)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, choices=list(LAYOUTS))
    parser.add_argument("--layers", type=int, default=48, help="blocks of the 125m width (48: 378 M parameters)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (>= 2: the peak is in step 2 or later)")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides, e.g. trainer.precision=bf16")
    parser.add_argument("--rss-limit-gb", type=float, default=16.0, help="kill the ranks above this summed RSS")
    parser.add_argument("--json", type=Path, help="also write every row here")
    a = parser.parse_args()
    base = ["model=125m", f"model.n_layers={a.layers}", "model.vocab_size=50257", "model.tie_embeddings=true",
            "data.seq_len=128", "trainer.micro_batch_size=1", "trainer.max_steps=100", "optimizer.warmup_steps=1",
            "logger.wandb=false"]
    m = compose_config(*base).model
    print(f"model: {total_params(m) / 1e6:.1f} M parameters (125m width, {a.layers} blocks, GPT-2 vocabulary tied), "
          f"micro-batch 1 x 128 tokens; extra overrides: {a.set or 'none'}")
    print("MiB above a bare process of the same layout; measured = the highest phase of steps 2.."
          f"{a.steps}; planned = distlm plan's peak for the rank (without the allowance)")
    print(f"{'layout':10} {'rank':>4} {'stage':>5} {'elements':>9} {'start-up':>8} {'measured':>8} {'in':>15} "
          f"{'planned':>8} {'in':>15} {'meas/plan':>9} {'whole run':>9} {'planned':>8} {'meas/plan':>9}")
    rows = []
    for name in a.layouts:
        for row in compare(name, base, a.set, a.steps, a.rss_limit_gb):
            print(f"{name:10} {row['rank']:4} {row['stage']:5} {row['elements'] / 1e6:8.2f}M {row['startup_mb']:8.0f} "
                  f"{row['peak_mb']:8.0f} {row['peak_phase']:>15} {row['planned_mb']:8.0f} "
                  f"{row['planned_phase']:>15} {row['peak_mb'] / row['planned_mb']:9.3f} {row['run_peak_mb']:9.0f} "
                  f"{row['planned_run_mb']:8.0f} {row['run_peak_mb'] / row['planned_run_mb']:9.3f}", flush=True)
            rows.append(row)
        last = rows[-1]
        print(f"{name:10} phases, rank {last['rank']}: measured " + ", ".join(
            f"{k} {v:.0f}" for k, v in last["phases_mb"].items()) + " | planned " + ", ".join(
            f"{k} {v:.0f}" for k, v in last["planned_phases_mb"].items()) +
            f" | summed RSS of the ranks {last['summed_peak_gib']:.1f} GiB, {last['wall_s']:.0f} s, losses "
            f"{[round(x, 3) for x in last['losses']]}; distlm plan: {last['plan_host_per_node_gib']:.1f} GiB per node, "
            f"{'fits' if last['plan_fits'] else 'does NOT fit'}", flush=True)
        if a.json:  # after each layout: a run cut short keeps what it measured
            a.json.write_text(json.dumps(rows, indent=1))
    worst = max(rows, key=lambda r: abs(r["peak_mb"] / r["planned_mb"] - 1))
    print(f"worst rank: {worst['layout']} rank {worst['rank']}, measured / planned = "
          f"{worst['peak_mb'] / worst['planned_mb']:.3f}")


if __name__ == "__main__":
    main()
