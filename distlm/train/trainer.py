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
from distlm.train import checkpoint
from distlm.train.checkpoint import RunState
from distlm.train.engine import build_engine
from distlm.train.metrics import MetricsLogger, peak_flops

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
        torch.manual_seed(c.seed)  # the same initial weights on every rank
        self.model = Llama(c.model)
        self.engine = build_engine(self.model, c)
        self.device = self.engine.device
        self.state = RunState(config=to_dict(c), tokenizer_sha256=self.manifest.tokenizer_sha256)
        self.resumed = self._maybe_resume()
        if self.state.wandb_run_id is None:
            self.state.wandb_run_id = f"{c.run_name}-{int(time.time())}"
        self.metrics = MetricsLogger(c, self.state.wandb_run_id) if self.rank == 0 else None
        dp = c.data_parallel_size
        self.dp_rank = self.rank % dp
        self.train_data = ShardLoader(c.data.dir, split="train", micro_batch_size=c.trainer.micro_batch_size,
                                      dp_rank=self.dp_rank, dp_size=dp, seed=c.seed, shuffle=True)
        self.val_data = ShardLoader(c.data.dir, split="val", micro_batch_size=c.trainer.micro_batch_size,
                                    dp_rank=self.dp_rank, dp_size=dp, seed=0, shuffle=False)
        self.tokens_per_step = c.global_batch_size * c.data.seq_len
        self.flops_per_step = self.model.flops_per_token(c.data.seq_len) * self.tokens_per_step
        self.peak_flops = peak_flops()
        if self.rank == 0:
            log.info("model: %.2fM parameters; %d workers, data parallel %d, ZeRO-%d, %s; global batch %d x %d tokens",
                     self.model.num_params() / 1e6, self.world, dp, c.parallel.zero_stage,
                     c.trainer.precision.value, c.global_batch_size, c.data.seq_len)

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
        self.engine.eval()
        total = torch.zeros(2, device=self.device)
        with torch.no_grad():
            for batch in self.val_data.iter_batches(max_batches=self.c.trainer.eval_batches):
                batch = batch.to(self.device)
                total += torch.stack([self.engine(batch[:, :-1], batch[:, 1:]).float(), torch.ones((), device=self.device)])
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    def _log_eval(self) -> None:
        val_loss = self.evaluate()
        if self.metrics:
            self.metrics.log(self.state.step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)),
                             tokens_seen=self.state.tokens_seen)
            log.info("step %d: val_loss %.4f val_ppl %.2f", self.state.step, val_loss, math.exp(min(val_loss, 50)))

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
        batches = self.train_data.iter_batches(start_sample=self.state.samples_seen)
        if self.state.step >= end and self.rank == 0:
            log.info("already at step %d, nothing to train (stop at %d)", self.state.step, end)
        if not self.resumed:
            self._log_eval()  # the starting point of the validation curve
        while self.state.step < end:
            start = time.perf_counter()
            micro_losses = []
            for _ in range(t.grad_accum):
                batch = next(batches).to(self.device)
                micro_loss = self.engine(batch[:, :-1], batch[:, 1:])
                self.engine.backward(micro_loss)
                self.engine.step()
                micro_losses.append(micro_loss.detach())
            loss = _all_mean(torch.stack(micro_losses).mean())
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
                  "tokens_per_s": tokens_per_s, "step_seconds": seconds}
        if self.peak_flops:
            record["mfu"] = self.flops_per_step / seconds / (self.peak_flops * self.world)
        record = {k: float(v) if v is not None else None for k, v in record.items()}
        self.metrics.log(step, **record, tokens_seen=self.state.tokens_seen)
        if step % self.c.trainer.log_every == 0:
            log.info("step %d: loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", step, loss, record["lr"],
                     record["grad_norm"] or float("nan"), tokens_per_s)
