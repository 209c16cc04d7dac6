"""The DeepSpeed engine: its config dict, derived from distlm's Config, and `deepspeed.initialize`."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.nn as nn

from distlm.config import Config, Precision


def deepspeed_config(c: Config, use_cuda: bool) -> dict[str, Any]:
    t, o = c.trainer, c.optimizer
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": c.global_batch_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": c.parallel.zero_stage},
        "bf16": {"enabled": t.precision == Precision.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                # DeepSpeed's fused Adam is a CUDA kernel; on CPU torch's AdamW avoids a long JIT build.
                "torch_adam": not use_cuda,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": o.warmup_steps,
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": o.min_lr / o.lr,
            },
        },
        "steps_per_print": 10**9,  # distlm logs its own metrics
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights), not norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, c: Config):
    use_cuda = torch.cuda.is_available() and c.cluster.use_gpu
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, c.optimizer.weight_decay),
        config=deepspeed_config(c, use_cuda),
    )
    return engine
