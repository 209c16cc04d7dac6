"""Checkpoint save and load throughput of a real DeepSpeed engine (ZeRO-1, 1 rank, gloo), against plain
sequential write and read of the same number of bytes on the same disk (target >= 0.5x), and the training
time a save costs (saving is synchronous: the step after it starts when the save returns).

    python benchmarks/bench_checkpoint.py [--dim 768 --layers 12 --vocab 4096 --dir /path/on/the/disk]

Writes are timed to durable storage (each timing ends with os.sync(), for distlm's save and for the plain
write alike). Reads are timed cold, as a restarted job on a fresh node reads: before each read the files'
pages are evicted from the page cache (posix_fadvise DONTNEED on those files only, nothing else on the machine
is disturbed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import join_single_rank_group
from distlm.checkpoint import store
from distlm.config import compose_config, to_dict
from distlm.parallel.layout import make_layout
from distlm.train.worker.engine import build_engine

CHUNK = 16 * 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)  # model=125m's shape, with a 4k vocabulary
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory under ./build)")
    return p.parse_args()


def engine_for(a: argparse.Namespace):
    c = compose_config(
        f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}", f"model.n_kv_heads={a.heads}",
        f"model.ffn_dim={a.ffn}", f"data.tokenizer.vocab_size={a.vocab}", f"data.seq_len={a.seq}",
        f"trainer.micro_batch_size={a.batch}", "cluster.num_workers=1", "trainer.max_steps=100",
        "optimizer.warmup_steps=1")
    join_single_rank_group()
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


def main() -> None:
    a = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(a.dir or Path("build")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=root))
    try:
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
              f"files on {root} (best of {a.repeats})")
        print(f"save  {mb / best['save']:8,.0f} MB/s   plain write {mb / best['write']:8,.0f} MB/s   "
              f"ratio {best['write'] / best['save']:.2f}")
        print(f"load  {mb / best['load']:8,.0f} MB/s   plain read  {mb / best['read']:8,.0f} MB/s   "
              f"ratio {best['read'] / best['load']:.2f}")
        print(f"training time lost per save: {best['save']:.2f} s = {best['save'] / step_seconds:.1f} training steps "
              f"of {step_seconds:.2f} s (batch {a.batch} x {a.seq} tokens)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
