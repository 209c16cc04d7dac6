"""What the driver shows of a run: a live progress bar while it trains, and its summary at the end (also
what `distlm report` prints). Both read only the files rank 0 writes (distlm/train/worker/metrics.py)."""

from __future__ import annotations

import json
import math
import statistics
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distlm.checkpoint.store import find_latest
from distlm.train.worker.metrics import METRICS_FILE, SAMPLES_FILE, last_per_step, read_metrics


class ProgressBar(threading.Thread):
    """The driver's progress bar (step, loss, tokens/s, ETA), drawn from the records rank 0 appends to
    metrics.jsonl: bars drawn by workers would interleave with their forwarded logs. Off when stderr is
    not a terminal (a submitted job's log); the workers' periodic log lines carry the progress there."""

    def __init__(self, run_dir: str | Path, total_steps: int, file=None):
        super().__init__(daemon=True)
        self.file = file  # None = stderr
        self.path = Path(run_dir) / METRICS_FILE
        self.offset = self.path.stat().st_size if self.path.is_file() else 0  # only this run's records
        self.total = total_steps
        self.bar: tqdm | None = None  # made at the first step, so start-up time and resumed steps skew no ETA
        self.postfix: dict[str, str] = {}
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
        if self.bar is not None:
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
            self._show(json.loads(line))

    def _show(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            self.postfix["val"] = f"{record['val_loss']:.3f}"
            if self.bar is not None:
                self.bar.set_postfix(self.postfix)
        if "loss" not in record:
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=record["step"] - 1, desc="train", unit="step", disable=None,
                            dynamic_ncols=True, file=self.file)
        self.postfix.update(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if record.get("mfu") is not None:
            self.postfix["mfu"] = f"{record['mfu']:.1%}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(record["step"] - self.bar.n)


def _median(pairs: list[tuple[int, float]]) -> float:
    return statistics.median(v for _, v in pairs) if pairs else math.nan


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The run at a glance, from its metrics file and directory."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {run_dir} (expected {run_dir / METRICS_FILE})")
    train = last_per_step(records, "loss")
    val = last_per_step(records, "val_loss")
    step_seconds = last_per_step(records, "step_seconds")
    data_wait = last_per_step(records, "data_wait_seconds")
    memory = last_per_step(records, "gpu_mem_gib") or last_per_step(records, "rss_gib")
    checkpoints = last_per_step(records, "checkpoint_seconds")
    tail = [loss for _, loss in train[-10:]]
    samples = read_metrics(run_dir, SAMPLES_FILE)
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
        "tokens_per_s": _median(last_per_step(records, "tokens_per_s")),
        "step_seconds": _median(step_seconds),
        "mfu": _median(last_per_step(records, "mfu")),
        # Share of step time spent waiting for batches: near 0 unless the loader cannot keep up.
        "data_wait_share": (sum(v for _, v in data_wait) / sum(v for _, v in step_seconds)
                            if data_wait and step_seconds else math.nan),
        "peak_memory_gib": max((v for _, v in memory), default=math.nan),
        "memory_kind": "GPU" if last_per_step(records, "gpu_mem_gib") else "RSS",
        "checkpoint_seconds": _median(checkpoints),
        "skipped_steps": max((v for _, v in last_per_step(records, "skipped_steps")), default=0),
        "last_samples": [s for s in samples if s["step"] == samples[-1]["step"]] if samples else [],
        "checkpoint": str(ckpt_dir / latest) if latest else None,
        "hf_export": str(run_dir / "hf") if (run_dir / "hf" / "config.json").is_file() else None,
        "metrics": str(run_dir / METRICS_FILE),
        "wandb": str(run_dir / "wandb") if (run_dir / "wandb").is_dir() else None,
    }
