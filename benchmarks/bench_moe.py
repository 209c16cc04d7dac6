"""Mixture of experts on this machine.

    python benchmarks/bench_moe.py --data data              # all three parts, 500 training steps each run
    python benchmarks/bench_moe.py --parts block,ep2          # no training runs

block: forward + backward tokens/s of one sparse block (top-2 of 8 experts of ffn 768) against a dense block of
       the same active parameters (ffn 1536), dim 512, 4,096 tokens, one process; median of --reps after a warm-up.
ep2:   the same sparse block split over 2 gloo ranks (expert parallelism: 4 experts per rank), and the share of its
       time spent in the TP group's all-reduces (each rank's step timed with and without them).
train: model=tiny and model=tiny-moe (same active parameters) trained --steps steps on the shards in --data
       (one process, the demo's batch): final validation loss, tokens/s, and the expert load (max / mean tokens
       per expert, the last step's) of tiny-moe with its balancing loss and with model.moe.aux_loss_weight=0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distributed import run_ranks  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.model.llama import MLP, MoE  # noqa: E402
from distlm.model.parallelize import TensorParallelExperts  # noqa: E402
from distlm.parallel.layout import make_layout  # noqa: E402

DIM, TOKENS = 512, 4096
SPARSE = ["model=tiny-moe", f"model.dim={DIM}", "model.n_heads=8", "model.n_kv_heads=4", "model.moe.expert_ffn_dim=768",
          "data.tokenizer.vocab_size=512"]
DENSE_FFN = 2 * 768  # top-2 experts of 768 units: the same active MLP parameters


def timed(block: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    """Median seconds of one forward + backward of `block` on x (after a warm-up)."""
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        block(x).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def blocks() -> tuple[MoE, MLP]:
    c = compose_config(*SPARSE, f"model.ffn_dim={DENSE_FFN}")
    torch.manual_seed(0)
    sparse, dense = MoE(c.model).train(), MLP(c.model).train()
    for p in sparse.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return sparse, dense


def bench_block(reps: int) -> None:
    sparse, dense = blocks()
    x = torch.randn(1, TOKENS, DIM, requires_grad=True)
    t_sparse, t_dense = timed(sparse, x, reps), timed(dense, x, reps)
    print(f"block  sparse (top-2 of 8 x ffn 768) {TOKENS / t_sparse:,.0f} tokens/s, dense (ffn {DENSE_FFN}) "
          f"{TOKENS / t_dense:,.0f} tokens/s: sparse / dense = {t_dense / t_sparse:.2f}x  ({torch.get_num_threads()} "
          f"threads)")


def _ep2(rank: int, reps: int, out: dict) -> None:
    layout = make_layout(tp=2, pp=1)
    sparse, _ = blocks()
    sparse.experts = TensorParallelExperts(sparse.experts, layout.tp_group, layout.tp_rank, 2)
    for p in sparse.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(1)).requires_grad_()
    with_comm = timed(sparse, x, reps)
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: None  # the same work without the group's sums
    try:
        without = timed(sparse, x, reps)
    finally:
        dist.all_reduce = real
    out[rank] = (with_comm, without)


def bench_ep2(reps: int) -> None:
    out = torch.multiprocessing.Manager().dict()
    run_ranks(_ep2, 2, reps, out)
    with_comm = max(v[0] for v in out.values())
    without = max(v[1] for v in out.values())
    print(f"ep2    sparse block on 2 ranks (4 experts each, 1 thread each): {TOKENS / with_comm:,.0f} tokens/s; "
          f"all-reduce share of the time {1 - without / with_comm:.0%}")


def _train(rank: int, c, out: dict) -> None:
    from distlm.train.worker.metrics import read_metrics
    from distlm.train.worker.trainer import Trainer

    Trainer(c).fit()
    records = read_metrics(c.run_dir)
    steps = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    out["result"] = {"val_loss": val[-1], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
                     "load": steps[-1].get("moe_load_max_over_mean")}


def bench_train(data: str, steps: int) -> None:
    runs = {"tiny": ["model=tiny"], "tiny-moe": ["model=tiny-moe"],
            "tiny-moe, no balancing loss": ["model=tiny-moe", "model.moe.aux_loss_weight=0"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            c = compose_config(*overrides, f"data.dir={data}", f"run_dir={tmp}/{len(results)}", "cluster.num_workers=1",
                               f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "logger.wandb=false",
                               f"trainer.checkpoint_every={steps}")
            out = torch.multiprocessing.Manager().dict()
            run_ranks(_train, 1, c, out)
            results[name] = out["result"]
            r = results[name]
            load = f", expert load max/mean {r['load']:.2f}" if r["load"] else ""
            print(f"train  {name}: {steps} steps, val_loss {r['val_loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s{load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="block,ep2,train")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--data", default="data", help="preprocessed shards (make demo writes data/)")
    parser.add_argument("--steps", type=int, default=500)
    a = parser.parse_args()
    parts = a.parts.split(",")
    if "block" in parts:
        bench_block(a.reps)
    if "ep2" in parts:
        bench_ep2(a.reps)
    if "train" in parts:
        bench_train(a.data, a.steps)


if __name__ == "__main__":
    main()
