"""The optimizer step as configured, on real DeepSpeed engines of two gloo ranks: the optimizer torch builds, the
learning-rate schedule, which parameters decay, gradient clipping, and ZeRO-2 with the optimizer offloaded to the
CPU. Each expectation is computed here from the documented rule (conf/optimizer/adamw.yaml), not by distlm."""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

from distlm.config import compose_config
from distlm.model.llama import Llama
from distlm.model.parallelize import full_state_dict
from distlm.parallel.layout import make_layout
from distlm.train.worker.engine import build_engine

VOCAB, SEQ, MICRO = 300, 16, 2
SCHEDULE = {"max_steps": 10, "warmup_steps": 3, "lr": 1e-2, "min_lr": 1e-3}
CLIP, EPS = 1e-3, 1e-4  # a clip far below the gradient's norm; an epsilon that keeps Adam's step linear in it
LAYOUTS = {"zero1_dp2": ["parallel.zero_stage=1"], "zero3_dp2": ["parallel=zero3"], "tp2": ["parallel=tp2"]}


def engine_config(*overrides: str):
    return compose_config("model=test", f"data.tokenizer.vocab_size={VOCAB}", f"data.seq_len={SEQ}",
                          "cluster.num_workers=2", f"trainer.micro_batch_size={MICRO}", "trainer.grad_accum=1",
                          "trainer.max_steps=10", "optimizer.warmup_steps=2", *overrides)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def train_step(engine, ids: torch.Tensor, scale: float = 1.0) -> float:
    loss = engine(ids[:, :-1], labels=ids[:, 1:])
    engine.backward(loss * scale)
    engine.step()
    return loss.item()


def gathered(engine, layout) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below ZeRO-3
        return full_state_dict(engine.module, layout, VOCAB)


def start_at(engine, iteration: int) -> float:
    """Move the LR schedule (not the optimizer) past `iteration` updates; the lr the next step uses."""
    for _ in range(iteration):
        engine.lr_scheduler.step()
    return engine.get_lr()[0]


def _scenarios(rank: int, out: Path) -> None:
    results: dict = {}
    # The optimizer torch builds for each optimizer.* choice.
    for name, overrides in {"default": [], "unfused": ["optimizer.fused=false"], "adam": ["optimizer.type=Adam"]}.items():
        engine = build_engine(engine_config(*overrides), make_layout(1, 1))
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside ZeRO's wrapper
        results[f"optimizer_{name}"] = {"class": type(inner).__name__, **{k: inner.defaults[k] for k in (
            "betas", "eps", "weight_decay", "fused")}, "group_decay": [g["weight_decay"] for g in inner.param_groups]}

    # The LR schedule: the lr each step's update uses, whether it moved the weights, and the lr after it.
    c = engine_config(f"trainer.max_steps={SCHEDULE['max_steps']}", f"optimizer.warmup_steps={SCHEDULE['warmup_steps']}",
                      f"optimizer.lr={SCHEDULE['lr']}", f"optimizer.min_lr={SCHEDULE['min_lr']}")
    engine = build_engine(c, make_layout(1, 1))
    schedule = []
    for step in range(1, SCHEDULE["max_steps"] + 1):
        used = engine.get_lr()[0]
        before = [p.detach().clone() for p in engine.module.parameters()]
        train_step(engine, batch(1000 * step + rank))
        moved = any(not torch.equal(b, p) for b, p in zip(before, engine.module.parameters()))
        schedule.append({"step": step, "used": used, "moved": moved, "after": engine.get_lr()[0]})
    results["schedule"] = schedule

    # Weight decay alone: a step whose gradients are all zero (Adam's update is then 0), weight_decay 0.5.
    for name in ("zero1_dp2", "zero3_dp2"):
        lay = make_layout(1, 1)
        engine = build_engine(engine_config(*LAYOUTS[name], "optimizer.weight_decay=0.5"), lay)
        lr = start_at(engine, 3)
        before = gathered(engine, lay)
        train_step(engine, batch(rank), scale=0.0)
        results[f"decay_{name}"] = {"lr": lr, "before": before, "after": gathered(engine, lay)}

    # ZeRO-2 with the optimizer states and step on the CPU, against ZeRO-2 without.
    for name, offload in (("zero2", False), ("zero2_offload", True)):
        c = engine_config("parallel.zero_stage=2", f"parallel.offload_optimizer={offload}", "trainer.max_steps=6",
                          "optimizer.warmup_steps=1")
        lay = make_layout(1, 1)
        engine = build_engine(c, lay)
        initial = gathered(engine, lay)
        losses = [train_step(engine, batch(100 * step + rank)) for step in range(6)]
        results[name] = {"losses": losses, "initial": initial, "final": gathered(engine, lay),
                         "cpu_offload": bool(getattr(engine.optimizer, "cpu_offload", False))}

    # Gradient clipping: one step with a clip far below the gradient's norm, no weight decay. TP last: after a TP
    # engine DeepSpeed's global model-parallel state breaks the next engine without TP in this process.
    for name, layout in LAYOUTS.items():
        c = engine_config(*layout, f"optimizer.grad_clip={CLIP}", f"optimizer.eps={EPS}", "optimizer.weight_decay=0.0",
                          *(["trainer.micro_batch_size=4"] if name == "tp2" else []))
        lay = make_layout(c.parallel.tp, c.parallel.pp)
        engine = build_engine(c, lay)
        lr = start_at(engine, 3)
        before = gathered(engine, lay)
        ids = batch(lay.dp_rank) if lay.dp > 1 else torch.cat([batch(0), batch(1)])  # the global batch: 4 samples
        train_step(engine, ids)
        results[f"clip_{name}"] = {"lr": lr, "before": before, "after": gathered(engine, lay),
                                   "grad_norm": float(engine.get_global_grad_norm())}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("optimizer") / "results.pt"
    run_ranks(_scenarios, 2, out)
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------- the optimizer

def test_the_optimizer_is_torchs_fused_adamw_with_the_configured_hyperparameters(results):
    o = compose_config().optimizer
    built = results["optimizer_default"]
    assert built["class"] == "AdamW" and built["fused"] is True
    assert (tuple(built["betas"]), built["eps"]) == ((o.beta1, o.beta2), o.eps) == ((0.9, 0.95), 1e-8)
    assert built["group_decay"] == [o.weight_decay, 0.0] and o.weight_decay == 0.1  # matrices, then norm gains
    assert results["optimizer_unfused"]["class"] == "AdamW" and not results["optimizer_unfused"]["fused"]
    assert results["optimizer_adam"]["class"] == "Adam"  # L2 penalty in the gradient, not decoupled decay


# ---------------------------------------------------------------- the learning-rate schedule

def documented_lr(step: int) -> float:
    """conf/optimizer/adamw.yaml: linear warmup to lr over warmup_steps, then cosine decay to min_lr at
    trainer.max_steps; the lr of step `step` (1-based)."""
    lr, low, warmup, total = SCHEDULE["lr"], SCHEDULE["min_lr"], SCHEDULE["warmup_steps"], SCHEDULE["max_steps"]
    if step <= warmup:
        return lr * step / warmup
    return low + (lr - low) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_every_update_uses_the_documented_lr(results):
    for r in results["schedule"]:
        assert r["moved"], f"step {r['step']} left the weights as they were (lr {r['used']})"
        assert r["used"] == pytest.approx(documented_lr(r["step"]), rel=1e-9), r
        # after the update the engine holds the next step's lr (the trainer logs the one the update used)
        assert r["after"] == pytest.approx(documented_lr(min(r["step"] + 1, SCHEDULE["max_steps"])), rel=1e-9), r
    assert results["schedule"][-1]["used"] == pytest.approx(SCHEDULE["min_lr"], rel=1e-9)  # min_lr at the last step
    assert results["schedule"][0]["used"] == pytest.approx(SCHEDULE["lr"] / SCHEDULE["warmup_steps"], rel=1e-9)
    assert documented_lr(5) != pytest.approx(documented_lr(4), rel=1e-3)  # the check can fail


# ---------------------------------------------------------------- weight decay

@pytest.mark.parametrize("layout", ["zero1_dp2", "zero3_dp2"])
def test_weight_decay_shrinks_every_matrix_and_no_norm_gain(results, layout):
    """With zero gradients AdamW's step is its decoupled decay alone: w <- w (1 - lr wd) for the parameters of the
    decay group; the norm gains, which are not in it, stay bit for bit (ZeRO-3: decided on the unpartitioned shape)."""
    r = results[f"decay_{layout}"]
    factor = 1 - r["lr"] * 0.5
    assert r["lr"] > 0 and factor < 1 - 1e-4  # far from 1 compared with the tolerance below
    norms = {name for name in r["before"] if name.endswith("norm.weight")}
    assert len(norms) == 2 * 2 + 1  # model=test: two per block, the final one
    for name, before in r["before"].items():
        after = r["after"][name]
        if name in norms:
            assert torch.equal(after, before), name
        else:
            torch.testing.assert_close(after, before * factor, rtol=1e-6, atol=0, msg=name)


# ---------------------------------------------------------------- gradient clipping

def reference_gradients(before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of the global batch's mean loss, computed by one plain process from the same weights."""
    c = engine_config()
    model = Llama(c.model)
    model.load_state_dict(before)
    ids = torch.cat([batch(0), batch(1)])  # the dp ranks' micro-batches (or the TP ranks' one batch)
    model(ids[:, :-1], ids[:, 1:]).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_clipping_scales_the_whole_gradient_to_the_clip_norm(results, layout):
    """One AdamW step from fresh state moves each weight by -lr g / (|g| + eps) (bias-corrected m and sqrt(v) are
    g and |g|). With eps 1e-4 above the clipped gradient's entries (~1e-5) that is nearly linear in g, so the
    update tells the clipped gradient g * clip / |g|_global (DeepSpeed adds 1e-6 to the norm) from the raw one."""
    r = results[f"clip_{layout}"]
    grads = reference_gradients(r["before"])
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
    assert r["grad_norm"] == pytest.approx(norm, rel=1e-4), "the norm over all parameters of all ranks, once each"
    assert norm > 100 * CLIP
    scale = CLIP / (norm + 1e-6)
    for name, before in r["before"].items():
        clipped = grads[name] * scale
        expected = -r["lr"] * clipped / (clipped.abs() + EPS)
        unclipped = -r["lr"] * grads[name] / (grads[name].abs() + EPS)
        update = r["after"][name] - before
        rounding = torch.finfo(torch.float32).eps * before.abs().max().item()  # of w + update: 1e-7 for norm gains
        torch.testing.assert_close(update, expected, rtol=1e-3, atol=rounding, msg=lambda m: f"{name}: {m}")
        assert (unclipped - expected).abs().max() > 100 * (update - expected).abs().max(), name  # the check can fail


# ---------------------------------------------------------------- ZeRO-2 with the optimizer on the CPU

def test_zero2_with_the_optimizer_offloaded_trains_as_without(results):
    plain, offloaded = results["zero2"], results["zero2_offload"]
    assert offloaded["cpu_offload"] and not plain["cpu_offload"]  # DeepSpeed took its offload path
    assert offloaded["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    for name, w in plain["final"].items():
        torch.testing.assert_close(offloaded["final"][name], w, rtol=1e-5, atol=1e-7, msg=name)
    moved = max((plain["final"][n] - w).abs().max().item() for n, w in plain["initial"].items())
    assert moved > 1e-4  # trained: the comparison is not between untouched weights
