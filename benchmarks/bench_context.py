"""Context parallelism on this machine: each rank's activation memory at cp 2 against cp 1 (one long sequence),
and training throughput at cp 2 against cp 1.

    python benchmarks/bench_context.py                    # seq 8192 for memory, 4096 for speed
    python benchmarks/bench_context.py --memory-seq 16384 --speed-seq 8192 --steps 5

Memory: the bytes autograd keeps for backward in one forward pass of a training step (saved-tensor hooks,
distinct storages, parameters left out), and the process's peak RSS above its RSS before that step, per rank;
with `distlm plan`'s prediction beside them. Speed: whole optimizer steps of a real DeepSpeed engine (ZeRO-1,
fp32), one sample of `--speed-seq` tokens per step, on 1 rank with all threads (cp 1) and on 2 ranks with one
thread each (cp 2): tokens/s of the job, median of `--steps` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from distributed import run_ranks  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.parallel.layout import make_layout  # noqa: E402
from distlm.plan import saved_bytes_per_token  # noqa: E402
from distlm.train.worker.engine import build_engine  # noqa: E402

# model=test's shape, wider: attention and MLP both matter, and 8 query / 4 KV heads split over 2 ranks.
MODEL = ["model=test", "model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4",
         "model.ffn_dim=704", "data.tokenizer.vocab_size=512"]


def config(seq: int, cp: int):
    return compose_config(*MODEL, f"data.seq_len={seq}", f"parallel.cp={cp}", f"cluster.num_workers={cp}",
                          "trainer.micro_batch_size=1", "trainer.max_steps=100", "optimizer.warmup_steps=1",
                          "logger.wandb=false")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inputs(c, rank: int, cp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's slice of one random sample: ids, labels, positions."""
    tokens = torch.randint(0, c.model.vocab_size, (1, c.data.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    s = c.data.seq_len // cp
    part = tokens[:, rank * s: (rank + 1) * s + 1]
    return part[:, :-1], part[:, 1:], torch.arange(rank * s, (rank + 1) * s).expand(1, -1)


def _memory(rank: int, seq: int, cp: int, out: Path) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // cp))
    c = config(seq, cp)
    engine = build_engine(c, make_layout(1, 1, cp))
    ids, labels, positions = inputs(c, rank, cp, seed=0)
    engine(ids, labels, position_ids=positions).backward()  # a first step: the engine's own buffers exist after it
    engine.step()
    skip = {p.untyped_storage().data_ptr() for p in itertools.chain(engine.module.parameters(), engine.module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    before = rss_mb()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine(ids, labels, position_ids=positions)
    engine.backward(loss)
    engine.step()
    predicted = seq // cp * saved_bytes_per_token(c.model, 1, 4, c.model.n_layers, 0, True, True, cp)
    (out / f"memory_cp{cp}_rank{rank}.json").write_text(json.dumps(
        {"saved_mb": sum(saved.values()) / 2**20, "planned_mb": predicted / 2**20,
         "peak_above_start_mb": peak_rss_mb() - before}))


def _speed(rank: int, seq: int, cp: int, steps: int, out: Path) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // cp))
    c = config(seq, cp)
    engine = build_engine(c, make_layout(1, 1, cp))
    times = []
    for step in range(steps + 1):
        ids, labels, positions = inputs(c, rank, cp, seed=step)
        start = time.perf_counter()
        engine.backward(engine(ids, labels, position_ids=positions))
        engine.step()
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        (out / f"speed_cp{cp}.json").write_text(json.dumps({"step_s": statistics.median(times[1:])}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory-seq", type=int, default=8192)
    p.add_argument("--speed-seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for cp in (1, 2):
            run_ranks(_memory, cp, a.memory_seq, cp, out)
        print(f"activation memory per rank, one sample of {a.memory_seq} tokens, fp32 ({' '.join(MODEL[1:])}):")
        cp1 = json.loads((out / "memory_cp1_rank0.json").read_text())
        for cp in (1, 2):
            for rank in range(cp):
                r = json.loads((out / f"memory_cp{cp}_rank{rank}.json").read_text())
                print(f"  cp {cp} rank {rank}: saved {r['saved_mb']:8.1f} MiB ({r['saved_mb'] / cp1['saved_mb']:.2f}x cp 1),"
                      f" planner {r['planned_mb']:8.1f} MiB, peak RSS above the step's start "
                      f"{r['peak_above_start_mb']:8.1f} MiB ({r['peak_above_start_mb'] / cp1['peak_above_start_mb']:.2f}x)")
        for cp in (1, 2):
            run_ranks(_speed, cp, a.speed_seq, cp, a.steps, out)
        speed = {cp: a.speed_seq / json.loads((out / f"speed_cp{cp}.json").read_text())["step_s"] for cp in (1, 2)}
        print(f"training throughput, one sample of {a.speed_seq} tokens per step, {torch.get_num_threads()} threads in all:")
        for cp in (1, 2):
            print(f"  cp {cp}: {speed[cp]:8.0f} tokens/s")
        print(f"  cp 2 / cp 1: {speed[2] / speed[1]:.2f}x")


if __name__ == "__main__":
    main()
