"""The training loop one worker runs: DeepSpeed engine, streamed shards, eval, checkpoints, metrics."""

from __future__ import annotations

import logging
import math
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
from distlm.train import checkpoint
from distlm.train.checkpoint import RunState
from distlm.train.engine import build_engine
from distlm.train.metrics import DataWait, MetricsLogger, memory_metrics, mfu, peak_flops

log = logging.getLogger(__name__)


def _all_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


class Trainer:
    def __init__(self, c: Config):
        self.c = c
        deepspeed.init_distributed(dist_backend="nccl" if c.cluster.use_gpu else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.manifest = Manifest.load(c.data.dir)  # checked against the config on the driver
        self.layout = make_layout(c.parallel.tp, c.parallel.pp)
        # The same full initial weights on every rank, whatever the layout; each keeps its own part.
        torch.manual_seed(c.seed)
        model = Llama(c.model)
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token(c.data.seq_len)
        self.engine = build_engine(model, c, self.layout)
        self.pipelined = self.layout.pp > 1
        self.device = self.engine.device
        self.state = RunState(config=to_dict(c), tokenizer_sha256=self.manifest.tokenizer_sha256)
        self.resumed = self._maybe_resume()
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

    def _train_step(self, pairs) -> float:
        """One optimizer step over grad_accum micro-batches; the loss averaged over them and all replicas."""
        if self.pipelined:
            return self.engine.train_batch(data_iter=pairs).item()  # 1F1B schedule; the loss reaches every stage
        micro_losses = []
        for _ in range(self.c.trainer.grad_accum):
            inputs, labels = next(pairs)
            micro_loss = self.engine(inputs, labels)
            self.engine.backward(micro_loss)
            self.engine.step()
            micro_losses.append(micro_loss.detach())
        return _all_mean(torch.stack(micro_losses).mean())

    def _maybe_resume(self) -> bool:
        found = checkpoint.to_resume(self.c)  # checked against the config on the driver
        if found is None:
            return False
        ckpt_dir, tag = found
        restored = checkpoint.load(self.engine, ckpt_dir, tag)
        self.state.step, self.state.samples_seen = restored.step, restored.samples_seen
        self.state.tokens_seen, self.state.wandb_run_id = restored.tokens_seen, restored.wandb_run_id
        if self.rank == 0:
            log.info("resumed from %s at step %d (%d tokens seen)", ckpt_dir / tag, restored.step, restored.tokens_seen)
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
        checkpoint.save(self.engine, Path(self.c.run_dir) / "checkpoints", self.state,
                        self.manifest.tokenizer_path, keep=self.c.trainer.keep_checkpoints)
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
        while self.state.step < end:
            start = time.perf_counter()
            loss = self._train_step(pairs)
            seconds = time.perf_counter() - start
            self.state.step += 1
            self.state.samples_seen += c.global_batch_size
            self.state.tokens_seen += self.tokens_per_step
            self._log_step(loss, seconds)
            if self.state.step % t.eval_every == 0 or self.state.step == end:
                self._log_eval()
            if self.state.step % t.checkpoint_every == 0 or self.state.step == end:
                self.save()
        if self.metrics:
            self.metrics.close()

    def _log_step(self, loss: float, seconds: float) -> None:
        if self.metrics is None:
            return
        step = self.state.step
        tokens_per_s = self.tokens_per_step / seconds
        record = {"loss": loss, "lr": self.engine.get_lr()[0], "grad_norm": self.engine.get_global_grad_norm(),
                  "tokens_per_s": tokens_per_s, "step_seconds": seconds,
                  "data_wait_seconds": self.train_batches.take(), **memory_metrics(self.device)}
        if self.peak_flops:
            record["mfu"] = mfu(self.flops_per_step, seconds, self.peak_flops, self.world)
        # A skipped_steps counter (NaN/spike skipping) belongs here once the trainer keeps one.
        record = {k: float(v) if v is not None else None for k, v in record.items()}
        self.metrics.log(step, **record, tokens_seen=self.state.tokens_seen)
        if step % self.c.trainer.log_every == 0:
            log.info("step %d: loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", step, loss, record["lr"],
                     record["grad_norm"] or float("nan"), tokens_per_s)
