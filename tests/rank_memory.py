"""Each rank's peak host memory in training steps, phase by phase, above a bare process of the same layout: real
gloo ranks, each a fresh spawned process (tests/test_train_memory.py, benchmarks/bench_train_memory.py).

A rank sets glibc's mmap threshold as a training worker does (cluster.malloc_mmap_threshold_kb; launch._worker_main)
and runs one torch thread. The bare run imports everything, creates the process groups and builds nothing; its peak
is getrusage's. In the built run the kernel's high-water mark (VmHWM) is reset (/proc/self/clear_refs) when each
phase starts and read when it ends: forward, backward, optimizer step (a pipeline's train_batch is one phase). The
first step has no Adam moments yet, so a rank's steady state is its highest phase from step 2 on. Library pages
(RssFile) that the kernel dropped since the build began, under other processes' memory pressure, are added back so
that a loaded machine does not make a rank look smaller (one run on this shared machine read 75 MiB low, probably
for this reason: not reproduced). A watchdog kills the ranks it started if their summed RSS passes a limit.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp

GiB = 2**30


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rank(rank: int, world: int, port: int, c, out: str, build: bool, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from distlm.memory import limit_heap_retention

    limit_heap_retention(c.cluster.malloc_mmap_threshold_kb)  # first thing, as a training worker
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import deepspeed
    import torch.distributed as dist

    from distlm.parallel.layout import make_layout
    from distlm.train.worker.engine import build_engine

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    layout = make_layout(c.parallel.tp, c.parallel.pp, c.parallel.cp)
    record = {"rank": rank, "stage": layout.stage, "phases": []}
    if build:
        record["prebuild_file_mb"] = _kib("RssFile") / 1024
        engine = build_engine(c, layout)
        record["startup_mb"] = _kib("VmHWM") / 1024
        g = torch.Generator().manual_seed(1000 + layout.dp_rank)
        micro, accum, seq = c.trainer.micro_batch_size, c.trainer.grad_accum, c.data.seq_len
        dist.barrier()

        def phase(name: str, run):
            _reset_peak()
            start = time.perf_counter()
            result = run()
            record["phases"].append({"phase": name, "peak_mb": _kib("VmHWM") / 1024, "file_mb": _kib("RssFile") / 1024,
                                     "s": time.perf_counter() - start})
            return result

        for step in range(1, steps + 1):
            pairs = [(b[:, :-1], b[:, 1:]) for b in
                     (torch.randint(0, c.model.vocab_size, (micro, seq + 1), generator=g) for _ in range(accum))]
            if c.parallel.pp > 1:
                loss = phase(f"{step}.train_batch", lambda: engine.train_batch(data_iter=iter(pairs)))
            else:
                for x, y in pairs:
                    loss = phase(f"{step}.forward", lambda: engine(x, y))
                    phase(f"{step}.backward", lambda: engine.backward(loss))
                    phase(f"{step}.optimizer step", engine.step)
            record.setdefault("losses", []).append(loss.item())
    dist.barrier()
    record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (Path(out) / f"{'built' if build else 'bare'}{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def _run(c, out: Path, build: bool, steps: int, limit_gib: float) -> float:
    """Run the ranks; kill them (only them) if their summed RSS passes the limit. Returns the summed peak, GiB."""
    world = c.cluster.num_workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank, args=(world, port, c, str(out), build, steps), nprocs=world, join=False,
                             start_method="spawn")
    pids, peak = [p.pid for p in ctx.processes], 0.0
    while not ctx.join(timeout=0.25):
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total / GiB)
        if total / GiB > limit_gib:
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            raise MemoryError(f"killed the ranks: their summed RSS {total / GiB:.1f} GiB passed {limit_gib} GiB")
    return peak


def measure_training(c, steps: int = 2, limit_gib: float = 16.0) -> list[dict]:
    """Per rank of c's layout (cluster.num_workers ranks): its pipeline stage, the bare process's peak (MiB), and, in
    MiB above it, its peak at start-up, each phase's highest peak over steps 2..steps and the whole run's peak
    (start-up and every step); its losses; the ranks'
    summed peak RSS (GiB) and the built run's wall seconds."""
    assert steps >= 2, "the steady state starts at step 2"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _run(c, out, False, 0, limit_gib)
        start = time.time()
        summed = _run(c, out, True, steps, limit_gib)
        wall = time.time() - start
        rows = []
        for rank in range(c.cluster.num_workers):
            bare = json.loads((out / f"bare{rank}.json").read_text())["peak_mb"]
            built = json.loads((out / f"built{rank}.json").read_text())
            phases: dict[str, float] = {}
            run_peak = built["startup_mb"]
            for p in built["phases"]:
                step, name = p["phase"].split(".", 1)
                # library pages the kernel dropped under other processes' memory pressure count as still held
                peak = p["peak_mb"] + max(0.0, built["prebuild_file_mb"] - p["file_mb"])
                run_peak = max(run_peak, peak)
                if int(step) >= 2:
                    phases[name] = max(phases.get(name, 0.0), peak - bare)
            rows.append({"rank": rank, "stage": built["stage"], "bare_mb": bare,
                         "startup_mb": built["startup_mb"] - bare, "phases_mb": phases,
                         "peak_mb": max(phases.values()), "peak_phase": max(phases, key=phases.get),
                         "run_peak_mb": run_peak - bare,
                         "losses": built["losses"], "summed_peak_gib": summed, "wall_s": wall})
    return rows
