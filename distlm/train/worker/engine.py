"""The DeepSpeed engine: its config dict, derived from distlm's Config, and `deepspeed.initialize`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from distlm.compat.deepspeed import shared_fp32_partitions
from distlm.config import Config, OptimizerConfig, OptimizerType, Precision, WarmupType
from distlm.model.llama import Block
from distlm.model.materialize import InitialWeights, SafetensorsWeights
from distlm.model.parallelize import build_model
from distlm.parallel.layout import Layout
from distlm.plan import zero_buffers


def deepspeed_config(c: Config, use_cuda: bool, load_universal: bool = False) -> dict[str, Any]:
    t, o = c.trainer, c.optimizer
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed's data-parallel ranks include the context-parallel ones (parallel/layout.py): each feeds it a
        # micro-batch of sequence slices.
        "train_batch_size": c.global_batch_size * c.parallel.cp,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero_config(c, use_cuda),
        "bf16": {"enabled": t.precision == Precision.bf16},
        "optimizer": {
            "type": o.type.value,
            "params": {
                "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                "adam_w_mode": o.type == OptimizerType.AdamW,
                # torch's AdamW, passed these params: its fused kernel (CPU and CUDA) needs no JIT build
                # (DeepSpeed's FusedAdam compiles with nvcc at start-up, and on CPU for minutes).
                "torch_adam": True,
                "fused": o.fused,
            },
        },
        # Resuming a checkpoint of another layout reads its universal (layout-free) form.
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,  # distlm logs its own metrics
        "wall_clock_breakdown": False,
    }


def learning_rate(step: int, o: OptimizerConfig, max_steps: int) -> float:
    """The learning rate optimizer step `step` (1-based) uses: it rises from 0 to optimizer.lr over warmup_steps
    (linearly, or as log(1 + step) with warmup_type=log), then follows a cosine down to min_lr at max_steps."""
    if step <= o.warmup_steps:
        rise = step / o.warmup_steps if o.warmup_type == WarmupType.linear else \
            math.log1p(step) / math.log1p(o.warmup_steps)
        return o.lr * rise
    progress = min(1.0, (step - o.warmup_steps) / (max_steps - o.warmup_steps))
    return o.min_lr + (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress)) / 2


class WarmupCosine(LambdaLR):
    """`learning_rate` as a torch scheduler, stepped by DeepSpeed after every update it applies (not after a
    skipped one): after k updates the optimizer holds the lr of update k + 1. Written here rather than DeepSpeed's
    WarmupCosineLR, which starts at iteration -1: its first two updates used lr 0 and its warmup and decay lagged
    one to two steps (tests/test_optimizer.py)."""

    def __init__(self, optimizer, o: OptimizerConfig, max_steps: int):
        super().__init__(optimizer, lambda done: learning_rate(done + 1, o, max_steps) / o.lr)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "last_batch_iteration" in state:  # a checkpoint written while DeepSpeed's WarmupCosineLR was used
            state = {"last_epoch": state["last_batch_iteration"] + 1, "_step_count": state["last_batch_iteration"] + 2}
        super().load_state_dict(state)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def zero_config(c: Config, use_cuda: bool) -> dict[str, Any]:
    par = c.parallel
    buffers = zero_buffers(c)  # conf gives them in blocks' worth of parameters; DeepSpeed wants elements
    zero: dict[str, Any] = {"stage": par.zero_stage, "reduce_bucket_size": buffers.reduce_bucket}
    if par.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=buffers.prefetch, stage3_max_live_parameters=buffers.max_live,
                    stage3_max_reuse_distance=buffers.reuse_distance, sub_group_size=buffers.sub_group)
    if not use_cuda:
        # Copying every gradient into one contiguous buffer saves GPU memory fragmentation; on CPU it
        # made the backward pass several times slower (benchmarks/bench_train_step.py).
        zero["contiguous_gradients"] = False
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if par.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return zero


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights), not norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 parameter is partitioned already: its shape is ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(c: Config, layout: Layout, load_universal: bool = False, weights: Path | None = None):
    """This rank's part of the model, built for the layout and wrapped in a DeepSpeed engine (a PipelineEngine
    when pp > 1). Its initial weights are drawn from `c.seed`, the same in every layout, or read by slice from
    `weights` (a safetensors file under one-process names). `load_universal`: the checkpoint to be loaded is
    a universal one (written at another layout)."""
    use_cuda = torch.cuda.is_available() and c.cluster.use_gpu
    config = deepspeed_config(c, use_cuda, load_universal)
    source = SafetensorsWeights(weights, c.model) if weights else InitialWeights(c.model, c.seed)
    module = build_model(c.model, layout, source, c.parallel.pipeline_partition.value,
                         c.parallel.activation_checkpoint_interval,
                         zero3_config=config if c.parallel.zero_stage == 3 else None, grad_accum=c.trainer.grad_accum)
    with shared_fp32_partitions():  # distlm/compat/deepspeed.py: one fp32 copy under ZeRO-3
        engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=param_groups(module, c.optimizer.weight_decay),
            lr_scheduler=lambda optimizer: WarmupCosine(optimizer, c.optimizer, c.trainer.max_steps),
            config=config,
            # The pipeline module brings its own grid; a one-stage model needs ours for its TP and data (x context)
            # groups. Always given: DeepSpeed keeps the last engine's grid in deepspeed.utils.groups otherwise.
            mpu=layout.grid if layout.pp == 1 else None,
        )
    return engine


def compile_blocks(module: nn.Module) -> int:
    """torch.compile every transformer block of the module in place, whatever the layout (a Llama, its TP
    split, pipeline stages): `Module.compile` keeps parameter names, so checkpoints and exports are unchanged.
    Blocks, not the whole model: they are identical, so one compiled graph serves them all, and ZeRO-3 hooks,
    pipeline stages and the vocabulary-parallel loss stay outside the compiled code. Returns the block count."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_seconds() -> float:
    """Wall seconds this process has spent in torch.compile so far (tracing, graph passes, code generation)."""
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("total_wall_time", 0.0)
