"""Corrections of, and reaches into, DeepSpeed 0.19.8 (pinned in pyproject.toml). tests/test_compat.py guards
each: it fails when an upgrade fixes the gap or moves the private names used here."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distlm.memory import return_freed_memory

WRITTEN_FOR = "0.19.8"


@contextmanager
def shared_fp32_partitions() -> Iterator[None]:
    """While DeepSpeed's ZeRO-3 optimizer is set up (`deepspeed.initialize`), let it use the rank's fp32 weight
    partition as its fp32 master partition instead of a copy, and hand back the per-parameter partitions it has
    just flattened.

    Gap: `DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions` means to share them when the weights are fp32
    already, but tests `tensor.device == self.device`, a torch.device against the string 'cpu' or 'cuda:0':
    never equal, so fp32 training held every weight twice (docs/scale.md). With devices on both sides it takes
    its sharing branch; bf16 weights still get their fp32 master copy. The partitions DeepSpeed copied into one
    flat buffer just before were freed, but glibc keeps them in its heap unless asked (distlm/memory.py)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = Stage3._create_fp32_partitions

    def create_sharing(self):
        return_freed_memory()
        device = self.device
        if isinstance(device, str) and not self.offload_optimizer:
            self.device = torch.device(device)
        try:
            create(self)
        finally:
            self.device = device

    Stage3._create_fp32_partitions = create_sharing
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = create


@contextmanager
def routing_checkpoint_writes(engine, write: Callable[[Any, Path, Callable[[Any, str], None]], None]) -> Iterator[None]:
    """During `engine.save_checkpoint`: every file DeepSpeed writes goes to `write(state_dict, path, save)` instead,
    where `save(state_dict, path)` is DeepSpeed's own writer (torch.save with its serialization options). DeepSpeed
    goes on with its next file when `write` returns.

    Gap: DeepSpeed writes every file of a checkpoint through `engine.checkpoint_engine.save(state_dict, path)`, with
    the live tensors, between barriers, and has no asynchronous writer distlm can use (0.19.8: Nebula removed; the
    decoupled engine needs DeepSpeed's launcher, refuses ZeRO-1/2 optimizer state and commits only in
    `engine.step()`, which pipelines bypass). Routing the files lets distlm (checkpoint/writer.py) write each one
    durably under a temporary name, or copy its tensors to host memory and write them in the background; and record
    a failed write instead of raising, since a rank that raised inside would leave the others waiting in
    DeepSpeed's barriers."""
    writer = engine.checkpoint_engine
    original = writer.save

    def save(state_dict, path):
        write(state_dict, Path(path), original)

    writer.save = save
    try:
        yield
    finally:
        del writer.save  # back to the class's method


def run_ds_to_universal(input_folder: Path, output_folder: Path,
                        run_parallel: Callable[[Callable, list], list] | None = None) -> None:
    """DeepSpeed's universal-checkpoint converter (`deepspeed.checkpoint.ds_to_universal`) on one checkpoint.

    Gap: it has no API but `main(args)` with its command line's namespace; and its two parallel phases (extract,
    merge) run on a local process pool (`_do_parallel_work(func, items, num_workers)`). `run_parallel(func,
    items)` replaces that pool (distlm runs the items as Ray tasks across the cluster); None keeps DeepSpeed's
    own serial loop."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(input_folder), output_folder=str(output_folder),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    serial = ds_to_universal._do_parallel_work
    if run_parallel:
        ds_to_universal._do_parallel_work = lambda work, items, _workers: run_parallel(work, items)
    try:
        ds_to_universal.main(args)
    finally:
        ds_to_universal._do_parallel_work = serial


def drop_accumulated_gradients(engine, micro_steps: int) -> None:
    """Forget the gradients accumulated by the first `micro_steps` micro-batches of the current step, as
    DeepSpeed's own fp16-overflow path clears them (ZeRO-1/2: stage_1_and_2.py `step()`; ZeRO-3: the reduced
    partitions), so the next micro-batch starts a fresh accumulation.

    Gap: no public call does this; distlm needs it to skip a step whose loss is NaN or spiking exactly, without
    running its last backward (distlm/train/worker/step.py)."""
    optimizer, stage = engine.optimizer, engine.zero_optimization_stage()
    optimizer.zero_grad(set_to_none=True)  # p.grad (and ZeRO's grad_accum)
    if stage in (1, 2):
        for buffers in (optimizer.averaged_gradients, optimizer.all_grad_tensors):
            for group in buffers:
                buffers[group] = None
    elif stage == 3:
        for grads in optimizer.averaged_gradients.values():
            for grad in grads or []:
                grad.zero_()
    engine.micro_steps -= micro_steps


def all_to_all_first_dim(group, x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-to-all over dim 0 of `x` ([group size, ...]: slice j goes to rank j, and slice j of the
    result came from rank j), which torch.compile traces with its gradient. `group` must have been registered
    with `register_all_to_all_group` first, outside any compiled code.

    Gap: an autograd.Function around a collective that fills a buffer compiles to a graph whose gradient is zero
    (DeepSpeed's own note in deepspeed/sequence/layer.py, where its DistributedAttention still uses one); the
    operator `deepspeed::dim_zero_all_to_all`, registered with torch.library and a declared backward, is traced
    correctly. DeepSpeed exposes it only as the private `_dim_zero_all_to_all`."""
    from deepspeed.sequence.layer import _dim_zero_all_to_all

    return _dim_zero_all_to_all(group, x)


def register_all_to_all_group(group) -> None:
    """Make `group` known to the exchange operator (it names groups by string: a process group cannot be an
    operator argument). A registration made inside a compiled region does not land before the operator reads it,
    so this runs when the model is built."""
    from deepspeed.sequence.layer import register_all_to_all_group as register

    register(group)
