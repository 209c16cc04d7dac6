"""Metrics from rank 0: a local JSONL file always, Weights & Biases when enabled; the driver's progress bar.

Per step rank 0 records loss, lr, grad_norm, tokens_per_s, tokens_seen, step_seconds, data_wait_seconds
(time spent waiting for the next batch), rss_gib (and gpu_mem_gib / gpu_mem_reserved_gib, the step's peak,
on GPUs) and mfu where the device's peak is known; at evaluations val_loss and val_ppl, plus a few greedy
continuations of validation prompts (samples.jsonl and a W&B table); at checkpoints checkpoint_seconds.

MFU (model FLOPs utilization) = achieved model FLOP/s / peak FLOP/s of all devices, where achieved =
flops_per_token * tokens per step / step seconds, flops_per_token = 6 N + 12 L d T (N non-embedding
parameters, L layers, d model width, T sequence length: forward + backward matmuls, attention included,
recomputation not; PaLM appendix B), and peak = dense bf16 tensor-core FLOP/s per device (PEAK_TFLOPS,
or logger.peak_tflops) x world size. The same peak is used for fp32 runs, so their MFU reads low.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from distlm.config import Config, WandbMode, to_dict
from distlm.train.checkpoint import find_latest

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
SAMPLE_PROMPT_TOKENS = 32  # at most; at most half the validation sequence, the rest is the reference

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per device, matched in order against the device name
# (more specific names first). Unknown devices and CPUs report no MFU unless logger.peak_tflops is set.
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("B200", 2250),
               ("B100", 1750), ("A100", 312), ("L40S", 362), ("A10G", 125), ("L4", 121), ("MI300X", 1307))


def peak_flops(c: Config) -> float | None:
    """Peak FLOP/s of one device: logger.peak_tflops if set, else looked up by GPU name."""
    if c.logger.peak_tflops is not None:
        return c.logger.peak_tflops * 1e12
    if not (c.cluster.use_gpu and torch.cuda.is_available()):
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name())
    return tflops * 1e12 if tflops else None


def peak_tflops_of(device_name: str) -> float | None:
    """'NVIDIA H100 80GB HBM3' -> 989; None for a device not in PEAK_TFLOPS."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def mfu(flops_per_step: float, seconds: float, peak_per_device: float, devices: int) -> float:
    return flops_per_step / seconds / (peak_per_device * devices)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Host memory of this process, and on a GPU the peak allocated / reserved since the last call."""
    gib = 2**30
    record = {"rss_gib": psutil.Process().memory_info().rss / gib}
    if device.type == "cuda":
        record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / gib
        record["gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / gib
        torch.cuda.reset_peak_memory_stats(device)
    return record


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int,
                         max_seq_len: int) -> torch.Tensor:
    """[batch, new_tokens] greedy continuations; no KV cache: a handful of tokens at eval time is cheap."""
    ids = prompts
    for _ in range(new_tokens):
        logits = model(ids[:, -max_seq_len:])
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


class MetricsLogger:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl and mirrors it to wandb."""

    def __init__(self, c: Config, wandb_run_id: str):
        self.c = c
        self.path = Path(c.run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        self._sample_prompts: torch.Tensor | None = None
        self._samples_off = c.logger.samples == 0
        lg = c.logger
        if lg.wandb and lg.mode != WandbMode.disabled:
            import wandb

            mode = lg.mode.value
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            # One W&B run per training run: a resumed job continues the run id saved in its checkpoint. The
            # config holds no secrets (those come from the environment only), so it is logged whole.
            self.wandb = wandb.init(project=lg.project, entity=lg.entity, name=lg.name or c.run_name, group=lg.group,
                                    tags=list(lg.tags), id=wandb_run_id, resume="allow", dir=c.run_dir, mode=mode,
                                    config=to_dict(c), settings=wandb.Settings(quiet=True, console="off"))
            self.wandb.define_metric("val_loss", summary="min")
            self.wandb.define_metric("val_ppl", summary="min")
            log.info("wandb %s run %s in %s", mode, wandb_run_id, self.wandb.dir)

    def log(self, step: int, **metrics: Any) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, model: torch.nn.Module, val_loader, tokenizer_file: Path) -> None:
        """Continue a few validation prompts greedily; log them with the true continuation beside them.

        Only for a plain, whole `Llama` on this rank: under tensor/pipeline parallelism or ZeRO-3 the rank
        holds a part of the model, and a forward pass outside the engine would be wrong or hang. The prompts
        are the first validation batch of `val_loader` (a ShardLoader), read once."""
        from distlm.model.llama import Llama

        if self._samples_off:
            return
        par = self.c.parallel
        if type(model) is not Llama or par.tp > 1 or par.pp > 1 or par.zero_stage == 3:
            log.info("generated samples are off: rank 0 does not hold the whole model (tp=%d, pp=%d, zero_stage=%d)",
                     par.tp, par.pp, par.zero_stage)
            self._samples_off = True
            return
        from tokenizers import Tokenizer

        device = next(model.parameters()).device
        if self._sample_prompts is None:  # the same prompts at every evaluation, to compare
            first = next(iter(val_loader.iter_batches(max_batches=1)), torch.zeros(0, 2, dtype=torch.long))
            first = first[0] if isinstance(first, (tuple, list)) else first  # (tokens, document segments)
            self._sample_prompts = first[: self.c.logger.samples]
        batch = self._sample_prompts
        prompt_len = min(SAMPLE_PROMPT_TOKENS, batch.shape[1] // 2)
        if len(batch) == 0 or prompt_len == 0:
            return
        prompts = batch[:, :prompt_len].to(device)
        new_tokens = self.c.logger.sample_tokens
        generated = greedy_continuations(model, prompts, new_tokens, self.c.model.max_seq_len)
        references = batch[:, prompt_len:prompt_len + new_tokens]
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        rows = [{"step": step, "prompt": tokenizer.decode(p.tolist()), "continuation": tokenizer.decode(g.tolist()),
                 "reference": tokenizer.decode(r.tolist())}
                for p, g, r in zip(prompts.cpu(), generated.cpu(), references)]
        with (self.path.parent / SAMPLES_FILE).open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.wandb is not None:
            import wandb

            columns = ["step", "prompt", "continuation", "reference"]
            table = wandb.Table(columns=columns, data=[[row[k] for k in columns] for row in rows])
            self.wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


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


def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    # A resumed run logs again the steps after its checkpoint; the newest record of a step wins.
    by_step = {r["step"]: r[key] for r in records if r.get(key) is not None}
    return sorted(by_step.items())


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
