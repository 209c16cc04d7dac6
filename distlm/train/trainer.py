"""The training loop one worker runs: DeepSpeed engine, streamed shards, eval, checkpoints, metrics."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from distlm.config import Config, to_dict
from distlm.data.loader import ShardLoader
from distlm.data.shards import Manifest
from distlm.model.llama import Llama
from distlm.parallel.layout import make_layout
from distlm.train import checkpoint, resume
from distlm.train.checkpoint import STOP_FILE, RunState
from distlm.train.engine import build_engine
from distlm.train.metrics import DataWait, MetricsLogger, memory_metrics, mfu, peak_flops
from distlm.train.resume import ResumePlan

log = logging.getLogger(__name__)

SPIKE_WINDOW = 20  # the spike rule compares a loss with the mean of this many recent kept steps ...
SPIKE_MIN_HISTORY = 5  # ... once it has at least this many
# Test hook: comma-separated STEP or STEP:MICRO_BATCH whose loss rank 0 turns into NaN after the forward.
NAN_STEPS_ENV = "DISTLM_TEST_NAN_STEPS"


def why_skip(loss: float, recent: list[float], spike_factor: float | None) -> str | None:
    """Why a step with this loss must not update the model, or None. Every rank passes the same all-reduced
    loss and history, so every rank decides the same."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if spike_factor and len(recent) >= SPIKE_MIN_HISTORY and loss > spike_factor * statistics.fmean(recent):
        return f"loss {loss:.4f} is above {spike_factor:g} x the recent mean {statistics.fmean(recent):.4f}"
    return None


def _all_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


class Trainer:
    def __init__(self, c: Config, plan: ResumePlan | None = None):
        self.c = c
        deepspeed.init_distributed(dist_backend="nccl" if c.cluster.use_gpu else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.manifest = Manifest.load(c.data.dir)  # checked against the config on the driver
        self.layout = make_layout(c.parallel.tp, c.parallel.pp)
        # The same full initial weights on every rank, whatever the layout; each keeps its own part.
        torch.manual_seed(c.seed)
        model = Llama(c.model)
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token(c.data.seq_len)
        self.state = RunState(config=to_dict(c), tokenizer_sha256=self.manifest.tokenizer_sha256)
        # Where the run starts: planned on the driver (launch.py); planned here when the trainer runs without one.
        self.plan = plan or resume.plan_resume(c, self.manifest.tokenizer_sha256)
        resume.load_weights(self.plan, model)  # imported weights: a new run from them
        self.engine = build_engine(model, c, self.layout, load_universal=self.plan.load_universal)
        self.pipelined = self.layout.pp > 1
        self.device = self.engine.device
        self.resumed = self._maybe_resume()
        self.skipped_in_a_row = 0
        self.nan_at = {tuple(map(int, (s + ":0").split(":")[:2])) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s}
        if self.state.wandb_run_id is None:
            self.state.wandb_run_id = f"{c.run_name}-{int(time.time())}"
        self.metrics = MetricsLogger(c, self.state.wandb_run_id) if self.rank == 0 else None
        lay = self.layout
        loading = dict(micro_batch_size=c.trainer.micro_batch_size, dp_rank=lay.dp_rank, dp_size=lay.dp,
                       shuffle_window=c.data.shuffle_window, workers=c.data.loader_workers,
                       shard_url=c.data.shard_url, verify=c.data.verify_shards)
        self.train_data = ShardLoader(c.data.dir, split="train", seed=c.seed, shuffle=True, **loading)
        self.val_data = ShardLoader(c.data.dir, split="val", seed=0, shuffle=False, **loading)
        # Pipeline stages in the middle receive activations, not data.
        self.reads_data = not self.pipelined or lay.is_first_stage or lay.is_last_stage
        self.tokens_per_step = c.global_batch_size * c.data.seq_len
        self.flops_per_step = self.flops_per_token * self.tokens_per_step
        self.peak_flops = peak_flops(c)
        if self.rank == 0:
            log.info("model: %.2fM parameters; %d workers = tp %d x pp %d x dp %d, ZeRO-%d, %s; global batch %d x %d "
                     "tokens", self.num_params / 1e6, self.world, lay.tp, lay.pp, lay.dp, c.parallel.zero_stage,
                     c.trainer.precision.value, c.global_batch_size, c.data.seq_len)

    def _pairs(self, batches):
        """(inputs, labels) on the device, or None where a pipeline stage reads no data."""
        if not self.reads_data:
            return None
        return ((b[:, :-1].to(self.device), b[:, 1:].to(self.device)) for b in batches)

    def _train_step(self, pairs) -> tuple[float, str | None]:
        """One optimizer step over grad_accum micro-batches -> (the loss averaged over them and all replicas,
        why the step was skipped or None).

        Each micro-batch's loss is checked (NaN/inf, spike) before its backward pass. A bad one skips the
        step: no further backward, no optimizer step, no LR-schedule step (as DeepSpeed's own fp16-overflow
        skip); gradients that earlier micro-batches of the step accumulated are dropped; the step's
        remaining micro-batches are read and not used, so the data position is the same as if it had run."""
        t = self.c.trainer
        if self.pipelined:
            return self._pipeline_step(pairs)
        micro_losses = []
        for i in range(t.grad_accum):
            inputs, labels = next(pairs)
            micro_loss = self.engine(inputs, labels)
            if (self.state.step + 1, i) in self.nan_at and self.rank == 0:
                micro_loss = micro_loss * float("nan")
            micro_losses.append(_all_mean(micro_loss))
            why = why_skip(micro_losses[-1], self.state.recent_losses, t.skip_spike_factor)
            if why:
                for _ in range(t.grad_accum - i - 1):
                    next(pairs)
                if i > 0:
                    self._drop_gradients(i)
                return micro_losses[-1], why
            self.engine.backward(micro_loss)
            self.engine.step()
        if self.engine.skipped_steps > self.ds_skipped:  # DeepSpeed's own check: non-finite gradients
            self.ds_skipped = self.engine.skipped_steps
            return statistics.fmean(micro_losses), "DeepSpeed found non-finite gradients and skipped the update"
        return statistics.fmean(micro_losses), None

    def _drop_gradients(self, micro_steps: int) -> None:
        """Forget the gradients accumulated by the first `micro_steps` micro-batches of this step: what
        DeepSpeed's own overflow path clears (ZeRO-1/2: stage_1_and_2.py step(); ZeRO-3: reduced partitions)."""
        optimizer, stage = self.engine.optimizer, self.engine.zero_optimization_stage()
        optimizer.zero_grad(set_to_none=True)  # p.grad (and ZeRO's grad_accum)
        if stage in (1, 2):
            for buffers in (optimizer.averaged_gradients, optimizer.all_grad_tensors):
                for group in buffers:
                    buffers[group] = None
        elif stage == 3:
            for grads in optimizer.averaged_gradients.values():
                for grad in grads or []:
                    grad.zero_()
        self.engine.micro_steps -= micro_steps  # the next micro-batch starts a fresh accumulation

    def _pipeline_step(self, pairs) -> tuple[float, str | None]:
        """DeepSpeed's train_batch runs forward, backward and the optimizer step together: the loss is known
        only after the update. Non-finite gradients are caught by its ZeRO-1 optimizer (it skips the update,
        counted here); a ZeRO-0 pipeline has no such check, so a non-finite loss there stops the run before a
        checkpoint could store the damaged weights. A spike cannot be undone: it is only logged."""
        loss = self.engine.train_batch(data_iter=pairs).item()  # 1F1B schedule; the loss reaches every stage
        if self.engine.skipped_steps > self.ds_skipped:
            self.ds_skipped = self.engine.skipped_steps
            return loss, "DeepSpeed found non-finite gradients and skipped the update"
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.state.step + 1}: loss is {loss} and the pipeline engine applied the "
                                     f"update (ZeRO-0 has no overflow check); the weights may be damaged. Resume from "
                                     f"the last checkpoint, with parallel.zero_stage=1 to have such steps skipped")
        why = why_skip(loss, self.state.recent_losses, self.c.trainer.skip_spike_factor)
        if why and self.rank == 0:
            log.warning("step %d: %s; a pipeline step cannot be skipped before its update, so it was applied",
                        self.state.step + 1, why)
        return loss, None

    def _maybe_resume(self) -> bool:
        restored = resume.restore(self.plan, self.engine)
        if restored is None:
            return False
        self.state.step, self.state.samples_seen = restored.step, restored.samples_seen
        self.state.tokens_seen, self.state.wandb_run_id = restored.tokens_seen, restored.wandb_run_id
        # The skip rule's memory too, so a resumed run decides as an uninterrupted one.
        self.state.skipped_steps, self.state.recent_losses = restored.skipped_steps, restored.recent_losses
        if self.rank == 0:
            log.info("resumed from %s at step %d (%d tokens seen)", self.plan.tag_dir, restored.step, restored.tokens_seen)
        return True

    def evaluate(self) -> float:
        """Mean validation loss over eval_batches batches per replica (the same count on every rank)."""
        count = min(self.c.trainer.eval_batches, self.val_data.batches_per_epoch)
        if count == 0:
            return float("nan")
        pairs = self._pairs(self.val_data.iter_batches(max_batches=count))
        if self.pipelined:
            return self.engine.eval_batch(data_iter=pairs, num_micro_batches=count).item()
        self.engine.eval()
        with torch.no_grad():
            loss = torch.stack([self.engine(inputs, labels).float() for inputs, labels in pairs]).mean()
        self.engine.train()
        return _all_mean(loss)

    def _log_eval(self) -> None:
        val_loss = self.evaluate()
        if self.metrics:
            self.metrics.log(self.state.step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)),
                             tokens_seen=self.state.tokens_seen)
            log.info("step %d: val_loss %.4f val_ppl %.2f", self.state.step, val_loss, math.exp(min(val_loss, 50)))
            self.metrics.log_samples(self.state.step, self.engine.module, self.val_data, self.manifest.tokenizer_path)

    def save(self) -> None:
        start = time.perf_counter()
        checkpoint.save(self.engine, Path(self.c.run_dir) / "checkpoints", self.state, self.manifest.tokenizer_path,
                        keep=self.c.trainer.keep_checkpoints, keep_every=self.c.trainer.keep_every)
        self.last_save = time.monotonic()
        if self.metrics:
            seconds = time.perf_counter() - start
            self.metrics.log(self.state.step, checkpoint_seconds=round(seconds, 3))
            log.info("step %d: checkpoint saved in %.1fs", self.state.step, seconds)

    def fit(self) -> None:
        c, t = self.c, self.c.trainer
        end = t.stop_at_step or t.max_steps
        self.train_batches = DataWait(self.train_data.iter_batches(start_sample=self.state.samples_seen))
        pairs = self._pairs(self.train_batches)
        if self.state.step >= end and self.rank == 0:
            log.info("already at step %d, nothing to train (stop at %d)", self.state.step, end)
        if not self.resumed:
            self._log_eval()  # the starting point of the validation curve
        self.last_save = time.monotonic()
        self.ds_skipped = self.engine.skipped_steps
        while self.state.step < end:
            start = time.perf_counter()
            loss, skipped = self._train_step(pairs)
            seconds = time.perf_counter() - start
            self.state.step += 1
            self.state.samples_seen += c.global_batch_size
            self.state.tokens_seen += self.tokens_per_step
            self._count(loss, skipped)
            self._log_step(loss, seconds, skipped)
            if self.skipped_in_a_row > t.max_skipped_in_a_row:
                raise FloatingPointError(
                    f"step {self.state.step}: {self.skipped_in_a_row} steps in a row were skipped ({skipped}), more "
                    f"than trainer.max_skipped_in_a_row={t.max_skipped_in_a_row}: the run is diverging or the data is "
                    f"bad. The checkpoints are intact (latest: {checkpoint.find_latest(Path(c.run_dir) / 'checkpoints')}"
                    f"); resume with a lower optimizer.lr, or skip the data")
            if self.state.step % t.eval_every == 0 or self.state.step == end:
                self._log_eval()
            stop, minutes_passed = self._rank0_says()
            if self.state.step % t.checkpoint_every == 0 or self.state.step == end or stop or minutes_passed:
                self.save()
            if stop:
                if self.rank == 0:
                    log.info("step %d: stopping as asked (%s), checkpoint saved", self.state.step, STOP_FILE)
                break
        if self.metrics:
            self.metrics.close()

    def _count(self, loss: float, skipped: str | None) -> None:
        if skipped:
            self.state.skipped_steps += 1
            self.skipped_in_a_row += 1
            if self.rank == 0:
                log.warning("step %d skipped: %s (%d in a row, %d in the run)", self.state.step, skipped,
                            self.skipped_in_a_row, self.state.skipped_steps)
        else:
            self.skipped_in_a_row = 0
            self.state.recent_losses = (self.state.recent_losses + [loss])[-SPIKE_WINDOW:]

    def _rank0_says(self) -> tuple[bool, bool]:
        """(a stop was requested, checkpoint_minutes have passed since the last save): rank 0 decides and
        broadcasts, so every rank saves and stops at the same step."""
        flags = torch.zeros(2, device=self.device)
        if self.rank == 0:
            minutes = self.c.trainer.checkpoint_minutes
            flags[0] = (Path(self.c.run_dir) / STOP_FILE).exists()
            flags[1] = minutes is not None and time.monotonic() - self.last_save >= minutes * 60
        dist.broadcast(flags, src=0)
        return bool(flags[0]), bool(flags[1])

    def _log_step(self, loss: float, seconds: float, skipped: str | None) -> None:
        if self.metrics is None:
            return
        step = self.state.step
        tokens_per_s = self.tokens_per_step / seconds
        grad_norm = None if skipped else self.engine.get_global_grad_norm()  # a skipped step has none
        record = {"loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "step_seconds": seconds,
                  "data_wait_seconds": self.train_batches.take(), **memory_metrics(self.device)}
        if self.peak_flops:
            record["mfu"] = mfu(self.flops_per_step, seconds, self.peak_flops, self.world)
        record = {k: float(v) if v is not None else None for k, v in record.items()}
        self.metrics.log(step, **record, tokens_seen=self.state.tokens_seen, skipped_steps=self.state.skipped_steps)
        if step % self.c.trainer.log_every == 0:
            log.info("step %d: loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", step, loss, record["lr"],
                     record["grad_norm"] or float("nan"), tokens_per_s)
