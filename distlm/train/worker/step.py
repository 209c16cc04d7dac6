"""One optimizer step on a DeepSpeed engine, and the decisions around it: skip a bad step (NaN/inf loss, a
spike) exactly, and what the loop does once a step is done (evaluate, save, stop)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distlm.compat.deepspeed import drop_accumulated_gradients
from distlm.config import TrainerConfig


def why_skip(loss: float, recent: list[float], spike_factor: float | None, min_history: int) -> str | None:
    """Why a step with this loss must not update the model, or None. Every rank passes the same all-reduced
    loss and history, so every rank decides the same. A spike needs `min_history` recent losses to compare."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if spike_factor and len(recent) >= min_history and loss > spike_factor * statistics.fmean(recent):
        return f"loss {loss:.4f} is above {spike_factor:g} x the recent mean {statistics.fmean(recent):.4f}"
    return None


@dataclass(frozen=True)
class AfterStep:
    """What the loop does once a step is done. Every rank derives it from the same inputs, so every rank
    evaluates, saves and stops at the same step (each of these is collective)."""
    evaluate: bool
    save: bool
    stop: bool


def after_step(step: int, end: int, t: TrainerConfig, stop_requested: bool, save_due: bool) -> AfterStep:
    """`stop_requested`: the driver asked to stop (SIGTERM); `save_due`: checkpoint_minutes have passed."""
    last = step == end
    return AfterStep(evaluate=step % t.eval_every == 0 or last,
                     save=step % t.checkpoint_every == 0 or last or stop_requested or save_due,
                     stop=stop_requested)


@dataclass
class StepResult:
    micro_losses: list[float]  # each micro-batch's loss averaged over all ranks
    flags: list[float]  # the control flags, summed over ranks
    why_skipped: str | None


def accumulate_and_step(engine, loss_of, batches, grad_accum: int, control_flags, why_skip_step) -> StepResult:
    """One optimizer step of a (non-pipeline) DeepSpeed engine over grad_accum micro-batches of `batches`
    ((inputs, labels) pairs; `loss_of(inputs, labels)` runs the engine's forward), with one collective and one
    host sync per step, not per micro-batch.

    The micro-batches' losses stay on the device until the last forward; then they and `control_flags()` (rank 0's
    stop requested and save due, zeros on the other ranks, so the sum is rank 0's value; each rank's "my save in
    flight failed") travel in one all-reduce, summed, read before the last backward. `why_skip_step(micro_losses)`
    (the same on every rank) says why the step must be skipped, or None. A skipped step runs no last backward, no optimizer step and no LR-schedule
    step (as DeepSpeed's own fp16-overflow skip), and the gradients the earlier micro-batches accumulated are
    dropped; all its micro-batches were read, so the data position is the same as if it had run."""
    micro_losses = []
    for i in range(grad_accum):
        inputs, labels = next(batches)
        micro_loss = loss_of(inputs, labels)
        micro_losses.append(micro_loss.detach().float())
        if i < grad_accum - 1:
            engine.backward(micro_loss)
            engine.step()  # not at the accumulation boundary: no update yet
    shared = torch.cat([torch.stack(micro_losses), torch.tensor(control_flags(), device=engine.device)])
    dist.all_reduce(shared)
    values = shared.tolist()
    world = dist.get_world_size()
    result = StepResult([v / world for v in values[:grad_accum]], values[grad_accum:], None)
    result.why_skipped = why_skip_step(result.micro_losses)
    if result.why_skipped:
        if grad_accum > 1:
            drop_accumulated_gradients(engine, grad_accum - 1)
        return result
    engine.backward(micro_loss)
    engine.step()
    return result
