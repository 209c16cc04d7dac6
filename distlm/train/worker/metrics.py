"""Metrics from rank 0: a local JSONL file always, Weights & Biases when enabled (the driver's view of them:
distlm/train/driver/progress.py).

Per step rank 0 records loss, lr, grad_norm, tokens_per_s, tokens_seen, step_seconds, data_wait_seconds
(time spent waiting for the next batch), rss_gib (and gpu_mem_gib / gpu_mem_reserved_gib, the step's peak,
on GPUs) and mfu where the device's peak is known; at evaluations val_loss and val_ppl, plus a few greedy
continuations of validation prompts (samples.jsonl and a W&B table); at checkpoints checkpoint_seconds (how long
the save stopped training) and checkpoint_wait_seconds (of it, waiting for the previous save to be written). With
sparse blocks (model.moe) also moe_aux_loss and moe_z_loss (means over the sparse blocks and micro-batches of the
step) and moe_load_max_over_mean (the busiest expert's tokens over the mean per expert: 1 is perfect balance; mean
over blocks, and its worst block as moe_load_max_over_mean_worst).

MFU (model FLOPs utilization) = achieved model FLOP/s / peak FLOP/s of all devices, where achieved =
flops_per_token * tokens per step / step seconds, flops_per_token = 6 N + 12 L d T (N non-embedding
parameters, L layers, d model width, T sequence length: forward + backward matmuls, attention included,
recomputation not; PaLM appendix B), and peak = dense bf16 tensor-core FLOP/s per device (PEAK_TFLOPS,
or logger.peak_tflops) x world size. The same peak is used for fp32 runs, so their MFU reads low.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from distlm.config import WANDB_ENV_MODES, Config, WandbMode, to_dict
from distlm.model.llama import MoE

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

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


def moe_metrics(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """The step's router statistics over the sparse blocks of every rank (each rank holds some of them), and
    clears them. Collective: every rank calls it after each step."""
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    stats = [s for m in blocks for s in m.stats]
    for m in blocks:
        m.stats.clear()
    local = torch.stack(stats).float() if stats else torch.zeros(0, 3)
    sums = torch.cat([local.sum(dim=0), torch.tensor([float(len(stats))])]).to(device)
    worst = (local[:, 2].max() if stats else torch.tensor(0.0)).to(device)
    dist.all_reduce(sums)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    aux, z, balance, n = sums.tolist()
    return {"moe_aux_loss": aux / n, "moe_z_loss": z / n, "moe_load_max_over_mean": balance / n,
            "moe_load_max_over_mean_worst": worst.item()}


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int,
                         max_seq_len: int) -> torch.Tensor:
    """[batch, new_tokens] greedy continuations; no KV cache: a handful of tokens at eval time is cheap."""
    ids = prompts
    for _ in range(new_tokens):
        logits = model(ids[:, -max_seq_len:])
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


def wandb_mode(configured: WandbMode) -> str:
    """The W&B mode a run uses: logger.mode, or for `auto` the environment's WANDB_MODE if set, else online
    when WANDB_API_KEY is set and offline without it. (wandb.init's own `mode` argument would override the
    environment, so `auto` resolves it here.)"""
    if configured != WandbMode.auto:
        return configured.value
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        if env_mode not in WANDB_ENV_MODES:  # validate_cluster refuses it before launch
            raise ValueError(f"WANDB_MODE={env_mode!r} in the environment: use one of {', '.join(WANDB_ENV_MODES)}, "
                             f"or unset it (logger.mode=auto then goes online when WANDB_API_KEY is set)")
        return env_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl and mirrors it to wandb.

    Monitoring never stops training: metrics.jsonl is the record that always holds, and W&B is best effort. A
    W&B server that cannot be reached at start (within logger.init_timeout) turns the run offline, with a
    warning that says how to upload it later; a W&B failure mid-run (e.g. its service process died) stops the
    mirroring, with a warning; at the end finish() waits at most logger.finish_timeout for uploads, and what is
    left stays on disk for `wandb sync`."""

    def __init__(self, c: Config, wandb_run_id: str, start_step: int = 0):
        self.c = c
        # A resumed run's W&B run already has a row at its start step (the step of the checkpoint it resumes):
        # what is logged at that step again goes to W&B with the next step's row, or W&B would drop it.
        self._wandb_floor = start_step if start_step > 0 else -1
        self._wandb_pending: dict[str, Any] = {}
        self.path = Path(c.run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        self._wandb_dir: Path | None = None  # the W&B run's local directory, what `wandb sync` uploads
        self._sample_prompts: torch.Tensor | None = None
        self._samples_off = c.logger.samples == 0
        if c.logger.wandb:
            mode = wandb_mode(c.logger.mode)
            if mode != "disabled":
                self.wandb = self._start_wandb(wandb_run_id, mode)

    def _start_wandb(self, run_id: str, mode: str):
        import wandb

        lg, c = self.c.logger, self.c

        def init(mode: str):
            # One W&B run per training run: a resumed job continues the run id saved in its checkpoint. The
            # config holds no secrets (those come from the environment only), so it is logged whole.
            run = wandb.init(project=lg.project, entity=lg.entity, name=lg.name or c.run_name, group=lg.group,
                             tags=list(lg.tags), notes=lg.notes, id=run_id, resume="allow", dir=c.run_dir, mode=mode,
                             config=to_dict(c), settings=wandb.Settings(quiet=True, console="off",
                                                                        init_timeout=lg.init_timeout,
                                                                        finish_timeout=lg.finish_timeout))
            for name in ("loss", "val_loss", "val_ppl", "val_loss/*"):   # the summary shows the best and the last
                run.define_metric(name, summary="min,last")
            log.info("wandb %s run %s in %s", mode, run_id, run.dir)
            self._wandb_dir = Path(run.dir).parent
            return run

        def failed(e: Exception) -> str:
            with contextlib.suppress(Exception):
                wandb.teardown()  # the failed run still holds its id in wandb's service
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

        try:
            return init(mode)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, training goes on
            error = failed(e)
        if mode != "online":
            log.warning("W&B could not start %s (%s): training goes on without W&B; metrics go to %s only", mode,
                        error, self.path)
            return None
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        try:
            run = init("offline")
        except Exception as e:  # noqa: BLE001 - e.g. the same bad setting fails offline too
            log.warning("W&B could not start online at %s (%s) nor offline (%s): training goes on without W&B; "
                        "metrics go to %s only", server, error, failed(e), self.path)
            return None
        # Only now that the offline run exists does the warning point at it.
        log.warning("W&B could not start online at %s (%s): training goes on and logs W&B offline to %s; upload "
                    "it later with `wandb sync %s`", server, error, self._wandb_dir, self._wandb_dir)
        return run

    def log(self, step: int, **metrics: Any) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_wandb(metrics, step)

    def _to_wandb(self, metrics: dict[str, Any], step: int) -> None:
        if self.wandb is None:
            return
        metrics = {k: v for k, v in metrics.items() if not isinstance(v, str)}   # W&B charts numbers only
        if step <= self._wandb_floor:
            self._wandb_pending.update(metrics)
            return
        metrics, self._wandb_pending = {**self._wandb_pending, **metrics}, {}
        try:
            self.wandb.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001 - a W&B failure mid-run must not stop training
            log.warning("W&B stopped working at step %d (%s: %s): training goes on; metrics keep going to %s, and "
                        "what W&B had received is in %s (upload it with `wandb sync`)", step, type(e).__name__, e,
                        self.path, self._wandb_dir)
            self.wandb = None
            import wandb

            with contextlib.suppress(Exception):  # forget the broken run; its service may be dead already
                wandb.teardown()

    def log_samples(self, step: int, model: torch.nn.Module, val_loader, tokenizer_file: Path) -> None:
        """Continue a few validation prompts greedily; log them with the true continuation beside them.

        Only for a plain, whole `Llama` on this rank: under tensor/pipeline parallelism or ZeRO-3 the rank
        holds a part of the model, and under context parallelism its attention waits for the other ranks of its
        group: a forward pass of rank 0 alone would be wrong or hang. The prompts
        are the first validation batch of `val_loader` (a ShardLoader), read once."""
        from distlm.model.llama import Llama

        if self._samples_off:
            return
        par = self.c.parallel
        if type(model) is not Llama or par.tp > 1 or par.pp > 1 or par.cp > 1 or par.zero_stage == 3:
            log.info("generated samples are off: rank 0 does not hold the whole model alone (tp=%d, pp=%d, cp=%d, "
                     "zero_stage=%d)", par.tp, par.pp, par.cp, par.zero_stage)
            self._samples_off = True
            return
        from tokenizers import Tokenizer

        device = next(model.parameters()).device
        if self._sample_prompts is None:  # the same prompts at every evaluation, to compare
            first = next(iter(val_loader.iter_batches(max_batches=1)), torch.zeros(0, 2, dtype=torch.long))
            first = first[0] if isinstance(first, (tuple, list)) else first  # (tokens, document starts)
            self._sample_prompts = first[: self.c.logger.samples]
        batch = self._sample_prompts
        prompt_len = min(self.c.logger.sample_prompt_tokens, batch.shape[1] // 2)
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
            self._to_wandb({"samples": table}, step)

    def close(self) -> None:
        if self.wandb is None:
            return
        try:
            self.wandb.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B could not finish the run (%s: %s); its records are in %s (upload them with `wandb sync`)",
                        type(e).__name__, e, self._wandb_dir)
        self.wandb = None


def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    # A resumed run logs again the steps after its checkpoint; the newest record of a step wins.
    by_step = {r["step"]: r[key] for r in records if r.get(key) is not None}
    return sorted(by_step.items())
