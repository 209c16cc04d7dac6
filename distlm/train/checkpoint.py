"""Sharded DeepSpeed checkpoints plus the run's own state, published only when complete.

Layout of `<run_dir>/checkpoints/`:
    step00000200/              one tag per saved step
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed's shards)
        rng_rank00000.pt ...   every rank's RNG states
        tokenizer.json         so the checkpoint alone can be exported
        distlm_state.json      step, samples and tokens seen, config; written last = complete
    latest                     the newest complete tag; moved only after every rank has finished
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STATE_FILE = "distlm_state.json"
LATEST_FILE = "latest"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why."""


@dataclass
class RunState:
    """What the run needs besides DeepSpeed's own state to continue exactly where it stopped."""

    step: int = 0
    samples_seen: int = 0  # global samples consumed: the loader's position
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the composed config that wrote it
    tokenizer_sha256: str = ""


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name and rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_state(tag_dir: Path) -> RunState:
    path = Path(tag_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {STATE_FILE} is missing (the save did not finish)")
    return RunState(**json.loads(path.read_text()))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if (p / STATE_FILE).is_file())


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag named by `latest`, or else the newest complete tag; None if there is none."""
    ckpt_dir = Path(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    latest = ckpt_dir / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag in tags:
            return tag
        log.warning("checkpoint %s named by %s is incomplete; using the newest complete one", ckpt_dir / tag, latest)
    return tags[-1] if tags else None


def resolve(path: Path) -> tuple[Path, str]:
    """A checkpoints directory (its latest tag) or one tag directory -> (checkpoints dir, tag)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    tag = find_latest(path)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return path, tag


def to_resume(c) -> tuple[Path, str] | None:
    """The checkpoint `trainer.resume` asks for: (checkpoints dir, tag), or None to start fresh."""
    if c.trainer.resume == "never":
        return None
    if c.trainer.resume == "auto":
        ckpt_dir = Path(c.run_dir) / "checkpoints"
        tag = find_latest(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    return resolve(Path(c.trainer.resume))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, state: RunState, tokenizer_file: Path, keep: int) -> Path:
    """Every rank writes its shards; rank 0 publishes the checkpoint once all have finished."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(state.step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        shutil.copyfile(tokenizer_file, tag_dir / TOKENIZER_FILE)
        write_atomic(tag_dir / STATE_FILE, json.dumps(asdict(state), indent=1))
        write_atomic(ckpt_dir / LATEST_FILE, tag)
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag_dir


def load(engine, ckpt_dir: Path, tag: str) -> RunState:
    """Restore model, optimizer, LR schedule and this rank's RNG; return the run state."""
    tag_dir = Path(ckpt_dir) / tag
    state = read_state(tag_dir)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = tag_dir / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():  # absent when the checkpoint came from fewer ranks
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
