"""Where a run starts, decided once: on the driver before any worker exists, then applied by every worker.

    plan_resume(c, tokenizer_sha256)   -> ResumePlan: which checkpoint (if any), how it loads; refusals here
    prepare(plan)                      driver, after Ray is up: the universal form a plan needs, on Ray tasks
    replan(c, plan)                    driver, a later attempt (restart, resize): this run's newest checkpoint
    imported_weights(plan)             worker, building the engine: an imported checkpoint's weights file, read by slice
    restore(plan, engine)              worker, after the engine: DeepSpeed's state and the run state

A plan records the layout it was made for, so a restart with another worker count can plan again with the
layout it has then (a checkpoint of this run then resumes through its universal form).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from distlm.checkpoint import mirror, store, universal, weights
from distlm.checkpoint.store import RunState
from distlm.config import CheckpointError, Config, ConfigError, to_dict

log = logging.getLogger(__name__)


class ResumeKind(str, Enum):
    fresh = "fresh"  # no checkpoint: the seed's initial weights, step 0
    same_layout = "same_layout"  # DeepSpeed loads the checkpoint's own shards, every rank's RNG too
    universal = "universal"  # written at another layout: loaded from its universal form (made by prepare)
    weights_only = "weights_only"  # imported (`distlm import-hf`): its weights, a fresh optimizer, step 0


@dataclass(frozen=True)
class ResumePlan:
    kind: ResumeKind
    layout: dict[str, int]  # the layout this plan is for (universal.layout_of of the config)
    tag_dir: Path | None = None  # the checkpoint to start from; None when fresh
    saved: RunState | None = None  # its run state: step, data position, the config (layout) that wrote it
    # Complete checkpoints of run_dir/checkpoints when the plan was made (store.snapshot): whatever
    # appears later was written by this run, which a restarted worker group continues from.
    existing: dict[str, int] = field(default_factory=dict)

    @property
    def load_universal(self) -> bool:
        return self.kind is ResumeKind.universal

    def describe(self) -> str:
        if self.kind is ResumeKind.fresh:
            return "step 0 (no checkpoint)"
        what = f"{self.tag_dir} (step {self.saved.step})"
        if self.kind is ResumeKind.weights_only:
            return f"the imported weights of {what}, with a fresh optimizer"
        if self.kind is ResumeKind.universal:
            return (f"{what}, written at {universal.describe(universal.layout_of(self.saved.config))}, through its "
                    f"universal form at {universal.describe(self.layout)}")
        return f"{what} at {universal.describe(self.layout)}"


def checkpoint_to_resume(c: Config) -> Path | None:
    """The checkpoint (tag dir) `trainer.resume` asks for, or None to start fresh. With trainer.checkpoint_mirror,
    `auto` downloads the mirror's newest checkpoint when run_dir has none."""
    if c.trainer.resume == "never":
        return None
    if c.trainer.resume == "auto":
        ckpt_dir = Path(c.run_dir) / "checkpoints"
        tag = store.find_latest(ckpt_dir)
        if tag is None and c.trainer.checkpoint_mirror:  # a new cluster, an empty run_dir: the mirror's newest
            tag = mirror.fetch_newest(c.trainer.checkpoint_mirror, ckpt_dir)
        return ckpt_dir / tag if tag else None
    return Path(*store.resolve(Path(c.trainer.resume)))


def plan_resume(c: Config, tokenizer_sha256: str, source: Path | None = None) -> ResumePlan:
    """The plan for config `c` (its layout) from `source` or else the checkpoint `trainer.resume` asks for.
    Refuses (ConfigError, naming the setting to change) what cannot continue: another model or tokenizer, a
    layout change universal checkpoints cannot do, a global batch that does not divide the position."""
    now = universal.layout_of(to_dict(c))
    existing = store.snapshot(Path(c.run_dir) / "checkpoints")
    tag_dir = checkpoint_to_resume(c) if source is None else Path(*store.resolve(source))
    if tag_dir is None:
        return ResumePlan(ResumeKind.fresh, now, existing=existing)
    saved = store.read_state(tag_dir)
    check_compatible(saved, c, tokenizer_sha256, tag_dir)
    if weights.is_weights_only(tag_dir):
        kind = ResumeKind.weights_only  # no optimizer, no layout: any layout
    elif universal.needs_universal(universal.layout_of(saved.config), now):
        check_layout_change(universal.layout_of(saved.config), now, tag_dir)
        kind = ResumeKind.universal
    else:
        kind = ResumeKind.same_layout
    if saved.samples_seen % c.global_batch_size:
        raise ConfigError(f"checkpoint {tag_dir} stopped after {saved.samples_seen} samples, not a multiple of the "
                          f"global batch {c.global_batch_size} (trainer.micro_batch_size x grad_accum x data-parallel "
                          f"size): choose a global batch that divides it, e.g. the checkpoint's "
                          f"{saved.samples_seen // max(saved.step, 1)}")
    return ResumePlan(kind, now, tag_dir, saved, existing)


ROPE_KEYS = ("rope_theta", "rope_scaling")  # may change on resume: extending the context of a trained model


def check_compatible(saved: RunState, c: Config, tokenizer_sha256: str, where: Path) -> None:
    """Never silently continue a different model, sample stream or tokenizer."""
    config = to_dict(c)
    now, was = config["model"], {"rope_scaling": None, **saved.config.get("model", {})}
    changed = [f"model.{k}: checkpoint {was.get(k)!r} vs config {v!r}"
               for k, v in now.items() if k not in ("init_std", "max_seq_len", *ROPE_KEYS) and was.get(k) != v]
    rope = [f"model.{k} {was.get(k)!r} -> {now[k]!r}" for k in ROPE_KEYS if was.get(k) != now[k]]
    if rope:  # the same weights at a longer context (continued pretraining): allowed, and said
        log.warning("checkpoint %s continues with other rotary position settings: %s", where, ", ".join(rope))
    if changed:
        raise ConfigError(f"checkpoint {where} was trained with a different model: {', '.join(changed)}; "
                          f"use the checkpoint's model settings, or trainer.resume=never to start over")
    if saved.samples_seen:  # the position is in one sample stream: the seed's order of the checkpoint's mix
        stream_was = {"seed": saved.config.get("seed"), "data.mix": _mix(saved.config.get("data", {}).get("mix"))}
        stream_now = {"seed": c.seed, "data.mix": _mix(config["data"]["mix"])}
        changed = [f"{k}: checkpoint {stream_was[k]} vs config {v}" for k, v in stream_now.items() if stream_was[k] != v]
        if changed:
            raise ConfigError(f"checkpoint {where} stopped {saved.samples_seen} samples into another sample stream: "
                              f"{', '.join(changed)}; resume with the checkpoint's settings, or trainer.resume=never "
                              f"to start over")
    if saved.tokenizer_sha256 != tokenizer_sha256:
        raise ConfigError(f"checkpoint {where} used tokenizer {saved.tokenizer_sha256[:12]} but data.dir={c.data.dir} "
                          f"has tokenizer {tokenizer_sha256[:12]}; train on the same tokenization, or "
                          f"trainer.resume=never to start over")


def _mix(mix: list[dict] | None) -> list[tuple[str, float]] | None:
    """A mixture as its sources' names and normalized weights: what decides which source each sample is from."""
    if not mix:
        return None
    total = sum(s["weight"] for s in mix)
    return [(s["name"], round(s["weight"] / total, 9)) for s in mix]


def check_layout_change(was: dict[str, int], now: dict[str, int], where: Path) -> None:
    """What DeepSpeed's universal checkpoints cannot carry from layout `was` to `now` (both layout_of)."""
    if was["zero_stage"] == 0:
        raise ConfigError(f"checkpoint {where} was written at {universal.describe(was)}; resuming it at "
                          f"{universal.describe(now)} needs a checkpoint written with parallel.zero_stage>=1. "
                          f"Resume with parallel.tp={was['tp']} parallel.pp={was['pp']} parallel.zero_stage=0")
    if (was["zero_stage"] == 3) != (now["zero_stage"] == 3):
        raise ConfigError(f"checkpoint {where} was written with ZeRO-{was['zero_stage']}; DeepSpeed's universal "
                          f"checkpoints do not carry optimizer states between ZeRO-3 and ZeRO 1/2: resume with "
                          f"parallel.zero_stage={was['zero_stage']} (any tp/pp/dp)")


def prepare(plan: ResumePlan) -> None:
    """Before any training rank starts: make the universal form a plan needs, on Ray tasks (the driver has
    connected to Ray), so that no rank waits in a collective while one process converts."""
    if not plan.load_universal or universal.is_complete(plan.tag_dir):
        return
    try:
        universal.convert(plan.tag_dir, on_ray=True)
    except Exception as e:  # the reason, named with the checkpoint
        raise CheckpointError(f"checkpoint {plan.tag_dir} was written at another layout and cannot be converted "
                              f"to a universal checkpoint: {type(e).__name__}: {e}") from e


def replan(c: Config, launch: ResumePlan) -> ResumePlan:
    """The plan of a later attempt (a restart, a resize; elastic.supervise): this run's newest checkpoint written
    since the launch plan was made, else the launch's own starting point, at the layout `c` has now."""
    from distlm.data.loading.mixture import main_dir
    from distlm.data.shards import Manifest

    source = store.newest_since(Path(c.run_dir) / "checkpoints", launch.existing) or launch.tag_dir
    if source is None:
        return ResumePlan(ResumeKind.fresh, universal.layout_of(to_dict(c)), existing=launch.existing)
    again = plan_resume(c, Manifest.load(main_dir(c.data)).tokenizer_sha256, source=source)
    return replace(again, existing=launch.existing)


def imported_weights(plan: ResumePlan) -> Path | None:
    """An imported checkpoint's weights file (one-process names), which each rank reads by slice as it builds
    its part of the model; None unless the run starts from imported weights."""
    return plan.tag_dir / store.WEIGHTS_FILE if plan.kind is ResumeKind.weights_only else None


def restore(plan: ResumePlan, engine) -> RunState | None:
    """Load the plan's checkpoint into the engine (weights, optimizer, LR schedule; the RNG at the same
    layout) and return its run state; None when there is nothing to restore. Collective."""
    if plan.kind not in (ResumeKind.same_layout, ResumeKind.universal):
        return None
    if plan.load_universal and not universal.is_complete(plan.tag_dir):
        raise CheckpointError(f"checkpoint {plan.tag_dir} has no universal form yet: it is made before the workers "
                              f"start (`distlm train` does it, or `distlm checkpoint reshape {plan.tag_dir}`)")
    return store.load(engine, plan.tag_dir.parent, plan.tag_dir.name, plan.load_universal)
