"""Start-up memory: each rank's peak RSS after its DeepSpeed engine is built, above a bare process of the same
layout (one that imports everything and creates the process groups, and builds nothing), against the rank's
share of the model states: 16 bytes per parameter element it holds (fp32 weight, gradient, Adam m and v).

    python benchmarks/bench_startup.py                      # 389M parameters: 1 process, TP2xPP4, ZeRO-3 DP8
    python benchmarks/bench_startup.py --layouts zero3_dp8 --layers 16   # 162M

Real gloo ranks on this machine (mp.spawn: every rank a fresh process). Before this change every rank built
and initialized the whole fp32 model (4 of the 16 bytes per parameter one process holds): at 8 ranks that
alone is 2x a rank's share.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from distributed import run_ranks  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.parallel.layout import make_layout  # noqa: E402
from distlm.train.worker.engine import build_engine  # noqa: E402  (imported by the bare process too)

STATE_BYTES = 16  # per parameter element in fp32 training: weight, gradient, Adam m and v
# name: (world size, overrides)
LAYOUTS = {
    "1 process": (1, ["parallel=dp", "trainer.micro_batch_size=8"]),
    "tp2_pp4": (8, ["parallel=tp2_pp2", "parallel.pp=4", "parallel.activation_checkpoint_interval=0",
                    "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "zero3_dp8": (8, ["parallel=zero3", "trainer.micro_batch_size=1"]),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _held_elements(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions, or its (TP/PP) parameters."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def _rank(rank: int, c, out: Path, build: bool) -> None:
    layout = make_layout(c.parallel.tp, c.parallel.pp)
    record = {"rank": rank, "stage": layout.stage, "tp_rank": layout.tp_rank}
    if build:
        initialize = deepspeed.initialize

        def recording_initialize(*args, **kwargs):  # the peak once the model is built, before DeepSpeed's part
            record["model_mb"] = peak_rss_mb()
            return initialize(*args, **kwargs)

        deepspeed.initialize = recording_initialize
        engine = build_engine(c, layout)
        record["elements"] = _held_elements(engine.module)
    record["peak_mb"] = peak_rss_mb()
    (out / f"{'built' if build else 'bare'}{rank}.json").write_text(json.dumps(record))


def measure(name: str, layers: int) -> list[str]:
    world, overrides = LAYOUTS[name]
    c = compose_config("model=125m", f"model.n_layers={layers}", "model.vocab_size=32000", "data.seq_len=64",
                       f"cluster.num_workers={world}", "logger.wandb=false", *overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_ranks(_rank, world, c, out, False)
        run_ranks(_rank, world, c, out, True)
        rows = []
        for rank in range(world):
            bare = json.loads((out / f"bare{rank}.json").read_text())
            built = json.loads((out / f"built{rank}.json").read_text())
            share_mb = STATE_BYTES * built["elements"] / 2**20
            above = built["peak_mb"] - bare["peak_mb"]
            model_above = built["model_mb"] - bare["peak_mb"]
            rows.append(f"{name:10} {rank:4} {built['stage']:5} {built['tp_rank']:3} {built['elements'] / 1e6:9.2f}M "
                        f"{share_mb:9.0f} {bare['peak_mb']:8.0f} {model_above:11.0f} {built['peak_mb']:8.0f} "
                        f"{above:8.0f} {above / share_mb:6.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    # 48 blocks: a ZeRO-3 DP8 rank's partition (48.6 M elements) is larger than the embedding DeepSpeed gathers
    # whole at set-up (24.6 M), as at scale (70B on 64 GPUs: 1.08 G vs 0.26 G); at 16 blocks it is not.
    parser.add_argument("--layers", type=int, default=48, help="blocks of the 125m shape (48: 389M parameters)")
    a = parser.parse_args()
    c = compose_config("model=125m", f"model.n_layers={a.layers}", "model.vocab_size=32000", "data.seq_len=64")
    with torch.device("meta"):
        from distlm.model.llama import Llama
        n = Llama(c.model).num_params()
    print(f"model: {n / 1e6:.1f}M parameters (125m shape, {a.layers} blocks, vocab 32000), fp32; model states "
          f"{STATE_BYTES} B/parameter = {STATE_BYTES * n / 2**20:.0f} MiB in one process; the whole fp32 model "
          f"{4 * n / 2**20:.0f} MiB")
    print("share = 16 B x parameter elements the rank holds; above = peak RSS after the engine is built minus the "
          "peak of a bare process of the same layout; model above = the same, once the model is built, before "
          "deepspeed.initialize (MiB)")
    print(f"{'layout':10} {'rank':>4} {'stage':>5} {'tp':>3} {'elements':>10} {'share':>9} {'bare':>8} "
          f"{'model above':>11} {'built':>8} {'above':>8} {'above/share':>6}")
    for name in a.layouts:
        for row in measure(name, a.layers):
            print(row, flush=True)


if __name__ == "__main__":
    main()
