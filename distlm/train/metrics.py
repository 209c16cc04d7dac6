"""Metrics from rank 0: a local JSONL file always, Weights & Biases when enabled."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from distlm.config import Config, WandbMode, to_dict
from distlm.train.checkpoint import find_latest

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class MetricsLogger:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl and mirrors it to wandb."""

    def __init__(self, c: Config, wandb_run_id: str):
        self.path = Path(c.run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if c.logger.wandb and c.logger.mode != WandbMode.disabled:
            import wandb

            mode = c.logger.mode.value
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            # One W&B run per training run: a resumed job continues the run id saved in its checkpoint.
            self.wandb = wandb.init(project=c.logger.project, entity=c.logger.entity, name=c.run_name,
                                    id=wandb_run_id, resume="allow", dir=c.run_dir, mode=mode,
                                    config=to_dict(c), settings=wandb.Settings(quiet=True, console="off"))
            log.info("wandb %s run %s in %s", mode, wandb_run_id, self.wandb.dir)

    def log(self, step: int, **metrics: Any) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class ProgressBar(threading.Thread):
    """The driver's progress bar (step, loss, tokens/s, ETA), drawn from the records rank 0 appends to
    metrics.jsonl: bars drawn by workers would interleave with their forwarded logs. Off when stderr is
    not a terminal; the workers' periodic log lines carry the progress there."""

    def __init__(self, run_dir: str | Path, total_steps: int):
        super().__init__(daemon=True)
        self.path = Path(run_dir) / METRICS_FILE
        self.offset = self.path.stat().st_size if self.path.is_file() else 0  # only this run's records
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=None, dynamic_ncols=True)
        self.finished = threading.Event()

    def __enter__(self) -> "ProgressBar":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finished.set()
        self.join()

    def run(self) -> None:
        while not self.finished.wait(1.0):
            self._read_new_records()
        self._read_new_records()
        self.bar.close()

    def _read_new_records(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            if "loss" in record:
                self.bar.n = record["step"]
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    # A resumed run logs again the steps after its checkpoint; the newest record of a step wins.
    by_step = {r["step"]: r[key] for r in records if r.get(key) is not None}
    return sorted(by_step.items())


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The run at a glance, from its metrics file and directory."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {run_dir} (expected {run_dir / METRICS_FILE})")
    train = last_per_step(records, "loss")
    val = last_per_step(records, "val_loss")
    speed = last_per_step(records, "tokens_per_s")
    tail = [loss for _, loss in train[-10:]]
    ckpt_dir = run_dir / "checkpoints"
    latest = find_latest(ckpt_dir)
    return {
        "steps": train[-1][0] if train else 0,
        "tokens_seen": max((r.get("tokens_seen") or 0) for r in records),
        "first_train_loss": train[0][1] if train else math.nan,
        "final_train_loss": sum(tail) / len(tail) if tail else math.nan,
        "first_val_loss": val[0][1] if val else math.nan,
        "final_val_loss": val[-1][1] if val else math.nan,
        "final_val_ppl": math.exp(min(val[-1][1], 50)) if val else math.nan,
        "tokens_per_s": sorted(s for _, s in speed)[len(speed) // 2] if speed else math.nan,  # median
        "checkpoint": str(ckpt_dir / latest) if latest else None,
        "hf_export": str(run_dir / "hf") if (run_dir / "hf" / "config.json").is_file() else None,
        "metrics": str(run_dir / "metrics.jsonl"),
        "wandb": str(run_dir / "wandb") if (run_dir / "wandb").is_dir() else None,
    }
