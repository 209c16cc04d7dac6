"""The training loop one worker runs: DeepSpeed engine, streamed shards, eval, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from distlm.checkpoint import store
from distlm.checkpoint.saver import Checkpointer
from distlm.checkpoint.store import STOP_FILE, RunState
from distlm.config import CheckpointError, Config, to_dict
from distlm.data.loading.loader import ShardLoader
from distlm.data.loading.mixture import MixtureStream, main_dir
from distlm.data.shards import Manifest
from distlm.model.llama import Llama, document_inputs
from distlm.parallel.layout import make_layout
from distlm.train import resume
from distlm.train.resume import ResumePlan
from distlm.train.worker.engine import build_engine, compile_blocks, compile_seconds
from distlm.train.worker.metrics import MetricsLogger, memory_metrics, mfu, moe_metrics, peak_flops
from distlm.train.worker.step import accumulate_and_step, after_step, why_skip

log = logging.getLogger(__name__)


def _all_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


class Trainer:
    """One worker's part of a run. Built in the order a reader can follow: join the process group, read the
    data's manifest, make the layout's groups, plan and restore where the run starts, then metrics and loaders."""

    def __init__(self, c: Config, plan: ResumePlan | None = None, attempt: dict | None = None):
        self.c = c
        # Which attempt of the driver's this is (a start, a restart, a resize) and at which size: logged once.
        self.attempt = attempt or {"attempt": 1, "workers": c.cluster.num_workers, "grad_accum": c.trainer.grad_accum}
        self._join_process_group()
        self.manifest = Manifest.load(main_dir(c.data))  # checked against the config on the driver
        self.layout = make_layout(c.parallel.tp, c.parallel.pp, c.parallel.cp)
        self.pipelined = self.layout.pp > 1
        self._count_flops()
        self.state = RunState(config=to_dict(c), tokenizer_sha256=self.manifest.tokenizer_sha256)
        # Where the run starts: planned on the driver (launch.py); planned here when the trainer runs without one.
        self.plan = plan or resume.plan_resume(c, self.manifest.tokenizer_sha256)
        self.engine = build_engine(c, self.layout, load_universal=self.plan.load_universal,
                                   weights=resume.imported_weights(self.plan))
        self.device = self.engine.device
        self.resumed = self._restore()
        self.checkpoints = Checkpointer(self.engine, Path(c.run_dir) / "checkpoints", self.manifest.tokenizer_path,
                                        c.trainer)
        self._compile()
        self.metrics = self._start_metrics()
        self.train_data, self.val_data, self.val_sources = self._loaders()
        # Pipeline stages in the middle receive activations, not data.
        self.reads_data = not self.pipelined or self.layout.is_first_stage or self.layout.is_last_stage
        self.skipped_in_a_row = 0
        self._log_start()

    def _join_process_group(self) -> None:
        c = self.c
        deepspeed.init_distributed(dist_backend="nccl" if c.cluster.use_gpu else "gloo")
        torch.set_float32_matmul_precision("high" if c.trainer.tf32 else "highest")  # "high": TF32 on CUDA
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(c.seed)

    def _count_flops(self) -> None:
        """Parameters and training FLOPs, for throughput and MFU (shapes only: each rank builds just its part)."""
        c = self.c
        with torch.device("meta"):
            model = Llama(c.model)
        # MFU counts the parameters a token uses (with sparse blocks: top_k of the experts).
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token(c.data.seq_len)
        self.tokens_per_step = c.global_batch_size * c.data.seq_len
        self.flops_per_step = self.flops_per_token * self.tokens_per_step
        self.peak_flops = peak_flops(c)

    def _compile(self) -> None:
        if self.c.trainer.compile:  # compiles lazily: at the first forward (evaluation) and backward (first step)
            compile_blocks(self.engine.module)
        self.compile_seconds_before = compile_seconds()

    def _start_metrics(self) -> MetricsLogger | None:
        """Rank 0 logs; a resumed run keeps its W&B run id (from the checkpoint)."""
        if self.state.wandb_run_id is None:
            self.state.wandb_run_id = f"{self.c.run_name}-{int(time.time())}"
        return MetricsLogger(self.c, self.state.wandb_run_id, self.state.step) if self.rank == 0 else None

    def _loaders(self) -> tuple[ShardLoader, ShardLoader, dict[str, ShardLoader]]:
        """(training batches, validation batches, each mixture source's validation batches by name) of this rank.
        The tensor-parallel ranks of a stage need the same batches: the first reads, the others receive."""
        c, lay = self.c, self.layout
        loading = dict(micro_batch_size=c.trainer.micro_batch_size, dp_rank=lay.dp_rank, dp_size=lay.dp,
                       broadcast_group=lay.tp_group if lay.tp > 1 else None, doc_boundaries=c.trainer.doc_masking,
                       tokens=self.sequence_slice)
        train = ShardLoader(c.data, split="train", seed=c.seed, shuffle=True, **loading)  # data.mix: the mixture
        # With data.mix: each source's validation split, evaluated apart (val_loss/NAME).
        sources = {s.name: ShardLoader(dataclasses.replace(c.data, dir=s.dir, mix=None), split="val", seed=0,
                                       shuffle=False, **loading) for s in c.data.mix or []}
        val = next(iter(sources.values())) if sources else ShardLoader(c.data, split="val", seed=0, shuffle=False,
                                                                       **loading)
        return train, val, sources

    def _log_start(self) -> None:
        if self.rank == 0:
            c, lay = self.c, self.layout
            log.info("model: %.2fM parameters; %d workers = %s, ZeRO-%d, %s; global batch %d x %d tokens",
                     self.num_params / 1e6, self.world, lay.describe(), c.parallel.zero_stage,
                     c.trainer.precision.value, c.global_batch_size, c.data.seq_len)

    @property
    def sequence_slice(self) -> slice | None:
        """The tokens of every sample this rank reads under context parallelism: its slice of the inputs and their
        labels (one token more); None = the whole sample."""
        cp = self.layout.cp
        if cp == 1:
            return None
        length = self.c.data.seq_len // cp
        return slice(self.layout.cp_rank * length, (self.layout.cp_rank + 1) * length + 1)

    def _model_batches(self, batches):
        """(inputs, labels) on the device, or None where a pipeline stage reads no data. The inputs are token ids;
        with trainer.doc_masking the tuple (token ids, document ids, positions), with context parallelism and no
        masking (token ids, positions): tuples of tensors, as pipeline stages pass them on."""
        if not self.reads_data:
            return None
        if self.c.trainer.doc_masking:
            return (self._inputs(tokens, starts) for tokens, starts in batches)
        return (self._inputs(tokens) for tokens in batches)

    def _inputs(self, tokens: torch.Tensor, starts: torch.Tensor | None = None) -> tuple:
        tokens = tokens.to(self.device)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        lay = self.layout
        offset = self.sequence_slice.start if lay.cp > 1 else 0
        if starts is not None:  # documents are numbered, and positions counted, over the whole sequence
            starts = starts[:, :-1].to(self.device)
            if lay.cp > 1:
                pieces = [torch.empty_like(starts) for _ in range(lay.cp)]
                dist.all_gather(pieces, starts.contiguous(), group=lay.cp_group)
                starts = torch.cat(pieces, dim=1)
            doc_ids, positions = document_inputs(starts, self.c.trainer.doc_positions)
            return (ids, doc_ids, positions[:, offset:offset + ids.shape[1]]), labels
        if lay.cp > 1:  # this slice's place in the sequence, for RoPE
            return (ids, torch.arange(offset, offset + ids.shape[1], device=self.device).expand_as(ids)), labels
        return ids, labels

    def _loss(self, inputs, labels) -> torch.Tensor:
        if not isinstance(inputs, tuple):
            return self.engine(inputs, labels)
        ids, *extra = inputs
        doc_ids, positions = (None, *extra) if len(extra) == 1 else extra
        return self.engine(ids, labels, doc_ids=doc_ids, position_ids=positions)

    def _train_step(self, batches, control_flags) -> tuple[float, str | None, list[float]]:
        """One optimizer step -> (its loss averaged over micro-batches and replicas, why it was skipped or None,
        the control flags summed over ranks). See `accumulate_and_step`."""
        if self.pipelined:
            return self._pipeline_step(batches, control_flags)
        t = self.c.trainer

        def why_skip_step(micro_losses: list[float]) -> str | None:  # the first bad micro-batch skips the step
            return next(filter(None, (why_skip(loss, self.state.recent_losses, t.skip_spike_factor,
                                               t.spike_min_history) for loss in micro_losses)), None)

        result = accumulate_and_step(self.engine, self._loss, batches, t.grad_accum, control_flags, why_skip_step)
        loss = statistics.fmean(result.micro_losses)
        if result.why_skipped:
            bad = next(x for x in result.micro_losses if why_skip_step([x]))
            return bad, result.why_skipped, result.flags
        if self.engine.skipped_steps > self.ds_skipped:  # DeepSpeed's own check: non-finite gradients
            self.ds_skipped = self.engine.skipped_steps
            return loss, "DeepSpeed found non-finite gradients and skipped the update", result.flags
        return loss, None, result.flags

    def _pipeline_step(self, batches, control_flags) -> tuple[float, str | None, list[float]]:
        """DeepSpeed's train_batch runs forward, backward and the optimizer step together: the loss is known
        only after the update. Non-finite gradients are caught by its ZeRO-1 optimizer (it skips the update,
        counted here); a ZeRO-0 pipeline has no such check, so a non-finite loss there stops the run before a
        checkpoint could store the damaged weights. A spike cannot be undone: it is only logged."""
        loss = self.engine.train_batch(data_iter=batches).item()  # 1F1B schedule; the loss reaches every stage
        flags = torch.tensor(control_flags(), device=self.device)
        dist.all_reduce(flags)  # summed over ranks (see _control_flags); a pipeline step syncs many times anyway
        flags = flags.tolist()
        if self.engine.skipped_steps > self.ds_skipped:
            self.ds_skipped = self.engine.skipped_steps
            return loss, "DeepSpeed found non-finite gradients and skipped the update", flags
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.state.step + 1}: loss is {loss} and the pipeline engine applied the "
                                     f"update (ZeRO-0 has no overflow check); the weights may be damaged. Resume from "
                                     f"the last checkpoint, with parallel.zero_stage=1 to have such steps skipped")
        t = self.c.trainer
        why = why_skip(loss, self.state.recent_losses, t.skip_spike_factor, t.spike_min_history)
        if why and self.rank == 0:
            log.warning("step %d: %s; a pipeline step cannot be skipped before its update, so it was applied",
                        self.state.step + 1, why)
        return loss, None, flags

    def _restore(self) -> bool:
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

    def validation_loss(self, val_data: ShardLoader | None = None) -> float:
        """Mean validation loss over eval_batches batches per replica (the same count on every rank)."""
        val_data = val_data or self.val_data
        count = min(self.c.trainer.eval_batches, val_data.batches_per_epoch)
        if count == 0:
            return float("nan")
        batches = self._model_batches(val_data.iter_batches(max_batches=count))
        if self.pipelined:
            return self.engine.eval_batch(data_iter=batches, num_micro_batches=count).item()
        self.engine.eval()
        with torch.no_grad():
            loss = torch.stack([self._loss(inputs, labels).float() for inputs, labels in batches]).mean()
        self.engine.train()
        return _all_mean(loss)

    def _log_eval(self) -> None:
        # A mixture's val_loss is the weighted mean of its sources' validation losses.
        per_source = {f"val_loss/{name}": self.validation_loss(loader) for name, loader in self.val_sources.items()}
        weights = [s.weight for s in self.c.data.mix or []]
        val_loss = self.validation_loss() if not per_source else \
            sum(w * loss for w, loss in zip(weights, per_source.values())) / sum(weights)
        if self.metrics:
            self.metrics.log(self.state.step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)),
                             tokens_seen=self.state.tokens_seen, **per_source)
            log.info("step %d: val_loss %.4f val_ppl %.2f", self.state.step, val_loss, math.exp(min(val_loss, 50)))
            with torch.compiler.set_stance("force_eager"):  # growing prompts would recompile at every length
                self.metrics.log_samples(self.state.step, self.engine.module, self.val_data,
                                         self.manifest.tokenizer_path)

    def save(self) -> None:
        """Collective. Asynchronous (trainer.async_checkpoint): training is stopped only while the rank's states are
        copied to host memory (and while a previous save still being written is waited for)."""
        start = time.perf_counter()
        waited = self.checkpoints.save(self.state)
        self.last_save = time.monotonic()
        if self.metrics:
            seconds = time.perf_counter() - start
            self.metrics.log(self.state.step, checkpoint_seconds=round(seconds, 3),
                             checkpoint_wait_seconds=round(waited, 3))
            if self.checkpoints.asynchronous:
                log.info("step %d: checkpoint copied in %.1fs (%.0f MB on rank 0%s); it is written in the background",
                         self.state.step, seconds, self.checkpoints.snapshot_bytes / 1e6,
                         f", {waited:.1f}s of it waiting for the previous save" if waited >= 0.1 else "")
            else:
                log.info("step %d: checkpoint saved in %.1fs", self.state.step, seconds)

    def fit(self) -> None:
        c, t = self.c, self.c.trainer
        end = t.stop_at_step or t.max_steps
        batches = self._model_batches(self.train_data.iter_batches(start_sample=self.state.samples_seen))
        if self.state.step >= end and self.rank == 0:
            log.info("already at step %d, nothing to train (stop at %d)", self.state.step, end)
        if self.metrics:
            lay = self.layout   # the string for people, the numbers for charts
            self.metrics.log(self.state.step, **self.attempt, layout=lay.describe(),
                             **{f"layout/{k}": getattr(lay, k) for k in ("dp", "tp", "pp", "cp")})
        if not self.resumed:
            self._log_eval()  # the starting point of the validation curve
        self.last_save = time.monotonic()
        self.ds_skipped = self.engine.skipped_steps
        self.compile_seconds_logged = 0.0
        stopped = False
        while self.state.step < end:
            lr = self.engine.get_lr()[0]  # what this step's update uses (the schedule moves after it)
            start = time.perf_counter()
            loss, skipped, (stop_requested, save_due, checkpoint_failed) = self._train_step(batches,
                                                                                           self._control_flags)
            seconds = time.perf_counter() - start
            self.state.step += 1
            self.state.samples_seen += c.global_batch_size
            self.state.tokens_seen += self.tokens_per_step
            self._count(loss, skipped)
            self._log_step(loss, lr, seconds, skipped,
                           moe_metrics(self.engine.module, self.device) if c.model.moe else {})
            if checkpoint_failed:  # a background write failed: every rank raises its CheckpointError at this step
                self.checkpoints.wait()
            self._raise_if_diverging(skipped)
            todo = after_step(self.state.step, end, t, bool(stop_requested), bool(save_due))
            if todo.evaluate:
                self._log_eval()
            if todo.save:
                self.save()
            if todo.stop:
                stopped = True
                break
        self.checkpoints.close()  # the end, a stop (SIGTERM, a resize): the save in flight completes first
        if stopped and self.rank == 0:
            log.info("step %d: stopping as asked (%s), checkpoint saved", self.state.step, STOP_FILE)
        if self.metrics:
            self.metrics.close()

    def _count(self, loss: float, skipped: str | None) -> None:
        t = self.c.trainer
        if skipped:
            self.state.skipped_steps += 1
            self.skipped_in_a_row += 1
            if self.rank == 0:
                log.warning("step %d skipped: %s (%d in a row, %d in the run)", self.state.step, skipped,
                            self.skipped_in_a_row, self.state.skipped_steps)
        else:
            self.skipped_in_a_row = 0
            self.state.recent_losses = (self.state.recent_losses + [loss])[-t.spike_window:]

    def _raise_if_diverging(self, skipped: str | None) -> None:
        t = self.c.trainer
        if self.skipped_in_a_row > t.max_skipped_in_a_row:
            try:
                self.checkpoints.close()  # the save in flight completes (it holds weights from before the skips)
            except CheckpointError as e:
                log.error("%s", e)
            raise FloatingPointError(
                f"step {self.state.step}: {self.skipped_in_a_row} steps in a row were skipped ({skipped}), more "
                f"than trainer.max_skipped_in_a_row={t.max_skipped_in_a_row}: the run is diverging or the data is "
                f"bad. The checkpoints are intact (latest: "
                f"{store.find_latest(Path(self.c.run_dir) / 'checkpoints')}); resume with a lower optimizer.lr, "
                f"or skip the data")

    def _control_flags(self) -> list[float]:
        """[a stop was requested, checkpoint_minutes have passed since the last save] on rank 0 (a file check and a
        clock read: microseconds; zeros on the others), and [this rank's save in flight failed] on every rank. They
        ride on the step's loss all-reduce, summed, so every rank saves, stops and raises at the same step without a
        collective of their own."""
        failed = float(self.checkpoints.failed)
        if self.rank != 0:
            return [0.0, 0.0, failed]
        minutes = self.c.trainer.checkpoint_minutes
        return [float((Path(self.c.run_dir) / STOP_FILE).exists()),
                float(minutes is not None and time.monotonic() - self.last_save >= minutes * 60), failed]

    def _source_metrics(self) -> dict[str, int]:
        """With data.mix: tokens_seen/NAME and epoch/NAME per source; a log line when a source was exhausted
        during this step and repeats."""
        if not isinstance(self.train_data.stream, MixtureStream):
            return {}
        now = self.train_data.stream.progress(self.state.samples_seen)
        before = self.train_data.stream.progress(self.state.samples_seen - self.c.global_batch_size)
        for name, (samples, epoch) in now.items():
            if epoch > before[name][1]:
                log.info("step %d: data source %s was exhausted; it repeats (epoch %d of it starts, %d samples fed "
                         "so far)", self.state.step, name, epoch, samples)
        return {**{f"tokens_seen/{name}": samples * self.c.data.seq_len for name, (samples, _) in now.items()},
                **{f"epoch/{name}": epoch for name, (_, epoch) in now.items()}}

    def _log_step(self, loss: float, lr: float, seconds: float, skipped: str | None, extra: dict[str, float]) -> None:
        if self.metrics is None:
            return
        step = self.state.step
        tokens_per_s = self.tokens_per_step / seconds
        grad_norm = None if skipped else self.engine.get_global_grad_norm()  # a skipped step has none
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "step_seconds": seconds,
                  "data_wait_seconds": self.train_data.wait_seconds(), **memory_metrics(self.device), **extra}
        if self.peak_flops:
            record["mfu"] = mfu(self.flops_per_step, seconds, self.peak_flops, self.world)
        if self.c.trainer.compile:
            record["compile_seconds"] = compile_seconds() - self.compile_seconds_before  # this trainer's
            if record["compile_seconds"] > self.compile_seconds_logged:  # the first step, and any recompilation
                self.compile_seconds_logged = record["compile_seconds"]
                log.info("step %d: %.1fs spent in torch.compile so far", step, record["compile_seconds"])
        record = {k: float(v) if v is not None else None for k, v in record.items()}
        self.metrics.log(step, **record, tokens_seen=self.state.tokens_seen, skipped_steps=self.state.skipped_steps,
                         **self._source_metrics())
        if step % self.c.trainer.log_every == 0:
            moe = f" moe_aux {extra['moe_aux_loss']:.4f} load {extra['moe_load_max_over_mean']:.2f}" if extra else ""
            log.info("step %d: loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f%s", step, loss, record["lr"],
                     record["grad_norm"] or float("nan"), tokens_per_s, moe)
