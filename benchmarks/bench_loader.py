"""The loader's speed against what a training step consumes, measured in one run.

    python benchmarks/bench_loader.py [--batches 400] [--steps 20]

Preprocesses the demo corpus (the King James Bible, conf/data/bible.yaml: 129-token samples) into a
temporary directory, then times, for data-parallel rank 0 of 2 with the demo's micro-batch of 16:
  - ShardLoader samples/s, in the training process (loader_workers=0) and with 2 DataLoader workers, from
    the start of an epoch and resumed mid-epoch (time to the first batch included);
  - one training step of the demo model (model=tiny) in plain torch with 1 thread, as each Ray Train
    worker runs it: the samples/s a rank consumes.
The ratio says how much faster the loader feeds a rank than the rank can train.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from distlm.config import compose_config
from distlm.data.loader import ShardLoader
from distlm.data.preprocess import preprocess
from distlm.model.llama import Llama

REPO = Path(__file__).resolve().parents[1]
DP_SIZE, MICRO = 2, 16


def loader_samples_per_s(data_dir: Path, workers: int, batches: int, start_sample: int = 0) -> float:
    source = ShardLoader(data_dir, "train", MICRO, 0, DP_SIZE, seed=1, shuffle=True,
                         shuffle_window=compose_config().data.shuffle_window, workers=workers)
    start = time.perf_counter()
    count = sum(1 for _ in source.iter_batches(start_sample, max_batches=batches))
    return count * MICRO / (time.perf_counter() - start)


def mid_epoch(data_dir: Path) -> int:
    """A start_sample half-way through the first epoch (what a checkpoint's samples_seen would say)."""
    source = ShardLoader(data_dir, "train", MICRO, 0, DP_SIZE, seed=1, shuffle=True, shuffle_window=1)
    return source.batches_per_epoch // 2 * DP_SIZE * MICRO


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
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            manifest = preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={data_dir}"))
        finally:
            ray.shutdown()
        print(f"demo data: {manifest.num_samples('train'):,} train samples of {manifest.sample_len} tokens in "
              f"{len(manifest.shards('train'))} shards")
        results = {
            "loader, in process": loader_samples_per_s(data_dir, 0, args.batches),
            "loader, 2 DataLoader workers": loader_samples_per_s(data_dir, 2, args.batches),
            "loader, resumed mid-epoch": loader_samples_per_s(data_dir, 0, args.batches, mid_epoch(data_dir)),
        }
        train = training_samples_per_s(data_dir, args.steps)
    print(f"\nrank 0 of {DP_SIZE}, micro-batch {MICRO}, shuffle window {compose_config().data.shuffle_window}")
    for name, rate in results.items():
        print(f"  {name:<30} {rate:>10,.0f} samples/s  = {rate / train:,.0f}x what a training step consumes")
    print(f"  {'training step (model=tiny)':<30} {train:>10,.1f} samples/s per rank (1 thread)")


if __name__ == "__main__":
    main()
