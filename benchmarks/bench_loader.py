"""The loader's speed and bytes read per rank, against what a training step consumes, measured in one run.

    python benchmarks/bench_loader.py [--batches 400] [--steps 20]

Preprocesses the demo corpus (the King James Bible, conf/data/bible.yaml: 129-token samples) into a
temporary directory, then measures, with the demo's micro-batch of 16:
  - for data-parallel rank 0 of 1, 2 and 4 ranks: ShardLoader samples/s (in the training process) and the
    bytes it read per sample kept, as the kernel counts them (/proc/self/io rchar: every read of the process),
    over whole epochs (the loader reads a window's share at once: a run that stops mid-window read ahead);
  - rank 0 of 2 with 2 DataLoader workers, and resumed mid-epoch (time to the first batch included);
  - one training step of the demo model (model=tiny) in plain torch with 1 thread, as each Ray Train
    worker runs it: the samples/s a rank consumes.
The ratios say how much faster the loader feeds a rank than the rank can train, and how close a rank's reads
come to its own samples (1.0 = only the bytes of the samples it keeps). Last, writing one shard of the same
samples (shards.write_shard, crc32s included) against one tar member per sample (format 2's layout, written
with Python's tarfile as webdataset's TarWriter does; its sha256 not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from distlm.config import compose_config
from distlm.data.loading.loader import ShardLoader
from distlm.data.loading.reading import read_samples
from distlm.data.preprocess.pipeline import preprocess
from distlm.data.shards import write_shard
from distlm.model.llama import Llama

REPO = Path(__file__).resolve().parents[1]
MICRO = 16


def rchar() -> int:
    """Bytes this process has read through read/pread system calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def measure(data_dir: Path, dp_size: int, batches: int, workers: int = 0, start_sample: int = 0) -> tuple[float, float]:
    """(samples/s, bytes read per sample kept) of rank 0 of dp_size."""
    data = dataclasses.replace(compose_config().data, dir=str(data_dir), loader_workers=workers)
    source = ShardLoader(data, "train", MICRO, 0, dp_size, seed=1, shuffle=True)
    read, start = rchar(), time.perf_counter()
    count = sum(1 for _ in source.iter_batches(start_sample, max_batches=batches))
    seconds, read = time.perf_counter() - start, rchar() - read
    return count * MICRO / seconds, read / (count * MICRO)


def whole_epochs(data_dir: Path, at_least: int) -> int:
    """A batch count >= at_least that ends every layout's run (dp 1, 2, 4) at the end of an epoch."""
    data = dataclasses.replace(compose_config().data, dir=str(data_dir))
    samples = ShardLoader(data, "train", MICRO, 0, 1, seed=1, shuffle=True).num_samples
    step = math.lcm(samples, 4 * MICRO) // MICRO   # batches of rank 0 of 1 that fill whole epochs; dp 2, 4 too
    return step * -(-at_least // step)


def mid_epoch(data_dir: Path, dp_size: int) -> int:
    """A start_sample half-way through the first epoch (what a checkpoint's samples_seen would say)."""
    data = dataclasses.replace(compose_config().data, dir=str(data_dir))
    source = ShardLoader(data, "train", MICRO, 0, dp_size, seed=1, shuffle=True)
    return source.batches_per_epoch // 2 * dp_size * MICRO


def write_ms_per_mb(samples: np.ndarray, out: Path, repeats: int = 3) -> tuple[float, float]:
    """(write_shard, Python tarfile one member at a time): best ms to write the samples, per MB of tokens."""
    def one_member_each() -> None:
        with tarfile.open(out / "members.tar", "w") as tar:
            for i, sample in enumerate(samples):
                data = sample.tobytes()
                info = tarfile.TarInfo(f"train-00000-{i:06d}.tokens.npy")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))

    def best(write) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            write()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3 / (samples.nbytes / 2**20)

    return best(lambda: write_shard(out / "train-00000.tar", samples)), best(one_member_each)


def training_samples_per_s(data_dir: Path, steps: int) -> float:
    torch.set_num_threads(1)  # cluster.cpus_per_worker=1: what each Ray Train worker gets here
    c = compose_config(f"data.dir={data_dir}")
    torch.manual_seed(0)
    model = Llama(c.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, c.model.vocab_size, (MICRO, c.data.seq_len + 1))
    for step in range(steps + 2):
        if step == 2:  # the first steps warm up allocators
            start = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * MICRO / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=400, help="loader batches per measurement")
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        corpus, data_dir = Path(tmp) / "kjv.jsonl", Path(tmp) / "bible"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_corpus.py"), str(corpus)], check=True,
                       capture_output=True)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            manifest = preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={data_dir}"))
        finally:
            ray.shutdown()
        record = manifest.layout.stride
        print(f"demo data: {manifest.num_samples('train'):,} train samples of {manifest.sample_len} tokens "
              f"({record}-byte records) in {len(manifest.shards('train'))} shards")
        measure(data_dir, 1, 2)   # one-time imports and file opens are not the loader's reads
        batches = whole_epochs(data_dir, args.batches)
        results = {f"rank 0 of {dp}": measure(data_dir, dp, batches) for dp in (1, 2, 4)}
        results["rank 0 of 2, 2 DataLoader workers"] = measure(data_dir, 2, args.batches, workers=2)
        results["rank 0 of 2, resumed mid-epoch"] = measure(data_dir, 2, args.batches,
                                                            start_sample=mid_epoch(data_dir, 2))
        train = training_samples_per_s(data_dir, args.steps)
        shard = manifest.shards("train")[0]
        samples = read_samples(str(manifest.shard_path(shard)), shard, manifest.layout, np.arange(shard.samples), True)[0]
        (Path(tmp) / "written").mkdir()
        written, members = write_ms_per_mb(samples, Path(tmp) / "written")
    print(f"\nmicro-batch {MICRO}, shuffle window {compose_config().data.shuffle_window}, {batches} batches per "
          f"layout (whole epochs), {args.batches} for the last two; bytes per sample kept as /proc/self/io counts them")
    for name, (rate, per_sample) in results.items():
        bytes_note = "" if "workers" in name or "resumed" in name else \
            f"{per_sample:>6,.0f} B/sample = {per_sample / record:.3f}x a record"
        print(f"  {name:<36} {rate:>8,.0f} samples/s = {rate / train:>5,.0f}x training   {bytes_note}")
    print(f"  {'training step (model=tiny)':<36} {train:>8,.1f} samples/s per rank (1 thread)")
    print(f"\nwriting {len(samples):,} samples ({samples.nbytes / 2**20:.2f} MB of tokens): one shard of records "
          f"{written:.1f} ms/MB, one tar member per sample {members:.1f} ms/MB = {members / written:.0f}x slower")


if __name__ == "__main__":
    main()
