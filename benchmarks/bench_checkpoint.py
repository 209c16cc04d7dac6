"""Checkpoint saves of real DeepSpeed engines (ZeRO-1, fp32, gloo).

Default: how long a save stops the training loop, asynchronous (trainer.async_checkpoint) vs synchronous (target:
<= 0.2x), at 2 ranks on a 110M-parameter model (model=125m's blocks, a 16k vocabulary); the step time while a
background write is in flight against the step time without one; and DeepSpeed's own save_checkpoint (what distlm
did before: files in the page cache, no fsync) for reference. Every save is timed on every rank from its call to its
return; a row shows the median over the repeats of the slower rank. Then steps/s with a save every --every steps,
synchronous and asynchronous, against no saves (rounds of --steps steps, the three kinds interleaved).

    python benchmarks/bench_checkpoint.py [--ranks 2 --repeats 3 --steps 6 --every 3 --rounds 3 --dim 768 --dir DIR]

--throughput: save and load throughput of one rank against plain sequential write and read of the same number of
bytes on the same disk (target >= 0.5x). Writes are timed to durable storage (each timing ends with os.sync(), for
distlm's save and for the plain write alike). Reads are timed cold, as a restarted job on a fresh node reads: before
each read the files' pages are evicted from the page cache (posix_fadvise DONTNEED on those files only, nothing else
on the machine is disturbed).

    python benchmarks/bench_checkpoint.py --throughput [--vocab 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import join_single_rank_group
from distlm.checkpoint import store
from distlm.checkpoint.saver import Checkpointer
from distlm.config import compose_config, to_dict
from distlm.parallel.layout import make_layout
from distlm.train.worker.engine import build_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # run_ranks: real gloo ranks
from distributed import run_ranks  # noqa: E402

CHUNK = 16 * 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)  # model=125m's shape, with a 4k vocabulary
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=None, help="default: 16384 (2 ranks), 4096 (--throughput)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="steps/s: this many steps per kind of save and round")
    p.add_argument("--every", type=int, default=3, help="... with a save every this many steps")
    p.add_argument("--rounds", type=int, default=3, help="... in this many rounds (the kinds interleaved)")
    p.add_argument("--throughput", action="store_true", help="save/load MB/s at 1 rank vs plain I/O")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory under ./build)")
    a = p.parse_args()
    a.vocab = a.vocab or (4096 if a.throughput else 16384)
    return a


def engine_for(a: argparse.Namespace, world: int = 1):
    c = compose_config(
        f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}", f"model.n_kv_heads={a.heads}",
        f"model.ffn_dim={a.ffn}", f"data.tokenizer.vocab_size={a.vocab}", f"data.seq_len={a.seq}",
        f"trainer.micro_batch_size={a.batch}", f"cluster.num_workers={world}", "trainer.max_steps=100",
        "optimizer.warmup_steps=1", "trainer.keep_checkpoints=1")
    join_single_rank_group()  # a no-op in a spawned rank: its group exists
    torch.manual_seed(0)
    return c, build_engine(c, make_layout(tp=1, pp=1))


def train_step(engine, c) -> float:
    start = time.perf_counter()
    tokens = torch.randint(0, c.model.vocab_size, (c.trainer.micro_batch_size, c.data.seq_len + 1))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - start


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plain_write(path: Path, nbytes: int) -> float:
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    with path.open("wb") as f:
        for offset in range(0, nbytes, CHUNK):
            f.write(block[: min(CHUNK, nbytes - offset)])
    os.sync()
    return time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop the (clean, synced) pages of a file or of every file under a directory from the page cache."""
    for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(path: Path) -> float:
    evict(path)
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - start


def _stops(rank: int, a: argparse.Namespace, work: Path) -> None:
    """One rank: steps without saves, then per repeat a save of each kind; asynchronous saves are followed by steps
    until every rank's background write is complete. Writes this rank's timings to work/rank<r>.json."""
    c, engine = engine_for(a, a.ranks)
    tokenizer = work / "tokenizer.json"
    tokenizer.write_text("{}")
    for _ in range(2):
        train_step(engine, c)  # Adam states exist after the first step
    plain = [train_step(engine, c) for _ in range(3)]
    savers = {asynchronous: Checkpointer(engine, work / f"async_{asynchronous}", tokenizer,
                                         dataclasses.replace(c.trainer, async_checkpoint=asynchronous))
              for asynchronous in (False, True)}
    stops = {"deepspeed": [], "sync": [], "async": []}
    in_flight, writes, copied = [], [], 0
    for i in range(a.repeats):
        state = store.RunState(step=i + 1, config=to_dict(c))
        dist.barrier()
        start = time.perf_counter()
        engine.save_checkpoint(str(work / "deepspeed"), tag=f"t{i}", save_latest=False)  # distlm before: no fsync
        stops["deepspeed"].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        savers[False].save(state)
        stops["sync"].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        savers[True].save(state)
        stops["async"].append(time.perf_counter() - start)
        copied = savers[True].snapshot_bytes
        while True:  # train while the write is in flight, until every rank's is done (a tiny all-reduce a step)
            done = torch.tensor([float(savers[True].in_flight.done.is_set())])
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
            if done.item():
                break
            in_flight.append(train_step(engine, c))
        writes.append(time.perf_counter() - start)
        savers[True].wait()
        dist.barrier()
        if rank == 0:
            shutil.rmtree(work / "deepspeed" / f"t{i}")
    files = {p.name: p.stat().st_size for p in (work / "async_True" / store.tag_for_step(a.repeats)).iterdir()}
    kinds = ["none", "sync", "async"]
    rates = {kind: {"seconds": 0.0, "final_wait": 0.0} for kind in kinds}
    for r in range(a.rounds):  # interleaved, each round in another order: other jobs' load drifts during a run
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            rate = steps_per_second(engine, c, a, savers[kind == "async"] if kind != "none" else None, 1000 * (r + 1))
            rates[kind] = {k: rates[kind][k] + rate[k] for k in rate}
    (work / f"rank{rank}.json").write_text(json.dumps({
        "rates": rates, "files": files, "stops": stops, "plain_steps": plain, "in_flight_steps": in_flight, "writes": writes, "copied": copied,
        "params": sum(p.numel() for p in engine.module.parameters())}))


def steps_per_second(engine, c, a: argparse.Namespace, saver: Checkpointer | None, first_step: int) -> dict:
    """a.steps training steps with a save after every a.every-th (none if saver is None), timed from the first step's
    start to the last step's end: each save's stop and any wait for the previous save count; the write still in
    flight after the last step does not (it is timed apart, as `final_wait`)."""
    dist.barrier()
    start = time.perf_counter()
    for s in range(1, a.steps + 1):
        train_step(engine, c)
        if saver is not None and s % a.every == 0:
            saver.save(store.RunState(step=first_step + s, config=to_dict(c)))
    seconds = time.perf_counter() - start
    final_wait = saver.wait() if saver is not None else 0.0
    dist.barrier()
    return {"seconds": seconds, "final_wait": final_wait}


def stop_times(a: argparse.Namespace, work: Path) -> None:
    run_ranks(_stops, a.ranks, a, work)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(a.ranks)]
    slowest = {mode: [max(r["stops"][mode][i] for r in ranks) for i in range(a.repeats)] for mode in ranks[0]["stops"]}
    stop = {mode: statistics.median(v) for mode, v in slowest.items()}
    mb = sum(ranks[0]["files"].values()) / 1e6
    print(f"model {ranks[0]['params'] / 1e6:.1f}M parameters, ZeRO-1, fp32, {a.ranks} gloo ranks; checkpoint {mb:,.0f} MB "
          f"in {len(ranks[0]['files'])} files; host copy {max(r['copied'] for r in ranks) / 1e6:,.0f} MB on the rank "
          f"that writes the most; median of {a.repeats} saves, the slower rank's")
    print(f"training stopped per save: synchronous {stop['sync']:.2f} s, asynchronous {stop['async']:.2f} s = "
          f"{stop['async'] / stop['sync']:.2f}x (target <= 0.2x); DeepSpeed's own save_checkpoint (no fsync, "
          f"distlm before) {stop['deepspeed']:.2f} s = async {stop['async'] / stop['deepspeed']:.2f}x of it")
    for mode, v in slowest.items():
        print(f"  {mode:9s} " + "  ".join(f"{x:6.2f}" for x in v))
    plain = statistics.median(x for r in ranks for x in r["plain_steps"])
    during = [x for r in ranks for x in r["in_flight_steps"]]
    write = statistics.median(max(r["writes"][i] for r in ranks) for i in range(a.repeats))
    print(f"step time: {plain:.2f} s without a save in flight; while a background write is in flight "
          + (f"{statistics.median(during):.2f} s (median of {len(during)} steps on all ranks, "
             f"{statistics.median(during) / plain:.2f}x)" if during else "no step ran (the write ended first)")
          + f"; a background write took {write:.2f} s from the save's start to its publication")
    rate = {kind: a.steps * a.rounds / max(r["rates"][kind]["seconds"] for r in ranks) for kind in ranks[0]["rates"]}
    print(f"{a.rounds} x {a.steps} steps, a save every {a.every} steps: " + ", ".join(
        f"{kind} {rate[kind]:.3f} steps/s ({rate[kind] / rate['none']:.2f}x)" for kind in ("none", "sync", "async"))
        + f"; the asynchronous writes still in flight after a round's last step took "
        f"{max(r['rates']['async']['final_wait'] for r in ranks):.2f} s more in all (not counted)")


def throughput(a: argparse.Namespace, work: Path) -> None:
    """Save (synchronous, durable) and cold load of one rank, and plain I/O of the same bytes."""
    c, engine = engine_for(a)
    tokenizer = work / "tokenizer.json"
    tokenizer.write_text("{}")
    ckpt_dir = work / "checkpoints"
    steps = [train_step(engine, c) for _ in range(3)][1:]  # Adam states exist after the first step
    step_seconds = min(steps)
    saves, loads, writes, reads = [], [], [], []
    for i in range(a.repeats):
        state = store.RunState(step=i + 1, config=to_dict(c))
        start = time.perf_counter()
        store.save(engine, ckpt_dir, state, tokenizer, keep=1)
        os.sync()
        saves.append(time.perf_counter() - start)
        nbytes = size_of(ckpt_dir / store.tag_for_step(i + 1))
        evict(ckpt_dir / store.tag_for_step(i + 1))
        start = time.perf_counter()
        store.load(engine, ckpt_dir, store.tag_for_step(i + 1))
        loads.append(time.perf_counter() - start)
        writes.append(plain_write(work / "plain.bin", nbytes))
        reads.append(plain_read(work / "plain.bin"))
        (work / "plain.bin").unlink()
    best = {name: min(v) for name, v in (("save", saves), ("load", loads), ("write", writes), ("read", reads))}
    mb = nbytes / 1e6
    print(f"model {sum(p.numel() for p in engine.module.parameters()) / 1e6:.1f}M parameters, ZeRO-1, fp32, "
          f"1 rank; checkpoint {mb:,.0f} MB in {len(list((ckpt_dir / store.tag_for_step(a.repeats)).iterdir()))} "
          f"files on {work.parent} (best of {a.repeats})")
    print(f"save  {mb / best['save']:8,.0f} MB/s   plain write {mb / best['write']:8,.0f} MB/s   "
          f"ratio {best['write'] / best['save']:.2f}")
    print(f"load  {mb / best['load']:8,.0f} MB/s   plain read  {mb / best['read']:8,.0f} MB/s   "
          f"ratio {best['read'] / best['load']:.2f}")
    print(f"synchronous save: {best['save']:.2f} s = {best['save'] / step_seconds:.1f} training steps "
          f"of {step_seconds:.2f} s (batch {a.batch} x {a.seq} tokens)")


def main() -> None:
    a = parse_args()
    root = Path(a.dir or Path("build")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=root))
    try:
        if a.throughput:
            torch.set_num_threads(os.cpu_count() or 1)
            throughput(a, work)
        else:
            stop_times(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
