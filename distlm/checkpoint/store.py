"""Sharded DeepSpeed checkpoints plus the run's own state, published only when complete.

Layout of `<run_dir>/checkpoints/`:
    step00000200/              one tag per saved step
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed's shards)
        rng_rank00000.pt ...   every rank's RNG states
        tokenizer.json         so the checkpoint alone can be exported
        distlm_state.json      step, samples and tokens seen, config, and the name and size of every
                               file above; written last = complete
    latest                     the newest complete tag; moved only after every rank has finished

A checkpoint is used only if it verifies: its state file reads, every file it lists is there with the
size it had when saved, and every .pt file is a whole zip archive. `find_latest` skips (and names) one
that does not, so a truncated or half-deleted newest checkpoint falls back to the previous one.
Retention keeps the newest `keep` checkpoints plus every `keep_every`-th step's, which are permanent.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distlm.checkpoint import universal
from distlm.checkpoint.writer import Failure, RankFiles
from distlm.compat.deepspeed import routing_checkpoint_writes
from distlm.config import CheckpointError
from distlm.files import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "distlm_state.json"
LATEST_FILE = "latest"
TOKENIZER_FILE = "tokenizer.json"
STOP_FILE = "stop_requested"  # in run_dir: the driver asks the workers to save and stop (SIGTERM, SIGINT)
WEIGHTS_FILE = "model.safetensors"  # only in imported checkpoints: their whole model, one-process names


@dataclass
class RunState:
    """What the run needs besides DeepSpeed's own state to continue exactly where it stopped."""

    step: int = 0
    samples_seen: int = 0  # global samples consumed: the loader's position
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the composed config that wrote it
    tokenizer_sha256: str = ""
    skipped_steps: int = 0  # steps skipped for a NaN/inf or spiking loss, over the whole run
    recent_losses: list[float] = field(default_factory=list)  # the spike rule's window, so a resume decides alike
    files: dict[str, int] = field(default_factory=dict)  # every file of the checkpoint and its size in bytes


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def read_state(tag_dir: Path) -> RunState:
    path = Path(tag_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {STATE_FILE} is missing (the save did not finish)")
    try:
        return RunState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {tag_dir} is corrupt: {path} does not read ({e})") from None


def verify(tag_dir: Path) -> RunState:
    """The run state of a checkpoint that is whole; CheckpointError naming it and the first problem otherwise.
    Cheap: sizes and zip directories, no tensor is read."""
    tag_dir = Path(tag_dir)
    state = read_state(tag_dir)
    for name, size in sorted(state.files.items()):  # empty for checkpoints written before files were listed
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {tag_dir} is corrupt: {name} has {path.stat().st_size} bytes, "
                                  f"{size} when it was saved (truncated or overwritten)")
    for path in sorted(tag_dir.glob("*.pt")):
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a cut one has no central directory
            raise CheckpointError(f"checkpoint {tag_dir} is corrupt: {path.name} is not a whole torch file")
    return state


def _list_files(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if (p / STATE_FILE).is_file())


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag named by `latest` if it verifies, or else the newest one that does; None if there is none.
    Every checkpoint passed over is logged with the reason."""
    ckpt_dir = Path(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    latest = ckpt_dir / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag in tags and _verifies(ckpt_dir / tag):
            return tag
        if tag not in tags:
            log.warning("checkpoint %s named by %s is incomplete; using the newest complete one", ckpt_dir / tag, latest)
    for tag in reversed(tags):
        if _verifies(ckpt_dir / tag):
            return tag
    return None


def _verifies(tag_dir: Path) -> bool:
    try:
        verify(tag_dir)
        return True
    except CheckpointError as e:
        log.warning("%s; skipping it", e)
        return False


def resolve(path: Path) -> tuple[Path, str]:
    """A checkpoints directory (its latest tag) or one tag directory -> (checkpoints dir, tag)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        verify(path)  # a checkpoint asked for by name is used whole or not at all
        return path.parent, path.name
    tag = find_latest(path)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    return path, tag


def snapshot(ckpt_dir: Path) -> dict[str, int]:
    """Complete tags and when they were published: what a launch found, to tell later saves apart."""
    return {tag: (Path(ckpt_dir) / tag / STATE_FILE).stat().st_mtime_ns for tag in complete_tags(ckpt_dir)}


def newest_since(ckpt_dir: Path, before: dict[str, int]) -> Path | None:
    """The newest verified checkpoint published after `before = snapshot(ckpt_dir)` was taken, or None."""
    for tag, published in reversed(snapshot(ckpt_dir).items()):
        if before.get(tag) != published and _verifies(Path(ckpt_dir) / tag):
            return Path(ckpt_dir) / tag
    return None


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


def save(engine, ckpt_dir: Path, state: RunState, tokenizer_file: Path, keep: int,
         keep_every: int | None = None) -> Path:
    """Every rank writes its shards; rank 0 publishes the checkpoint once all have finished. Collective and
    synchronous: it returns when the checkpoint is published (saver.Checkpointer also saves in the background).

    A failed write (disk full, quota, I/O error) on any rank makes every rank raise the same CheckpointError
    naming the file and the free space; the partial directory is removed and `latest` still names the
    previous checkpoint. Keeps the newest `keep` checkpoints and every `keep_every`-th step's."""
    files = RankFiles(Path(ckpt_dir) / tag_for_step(state.step), dist.get_rank())
    stage(engine, ckpt_dir, tokenizer_file, files)
    return commit(files, state, keep, keep_every, engine.device)


def stage(engine, ckpt_dir: Path, tokenizer_file: Path, files: RankFiles) -> None:
    """Hand every file of this rank's part of the checkpoint `files.tag_dir` to `files`: its DeepSpeed shards, its
    RNG states, and on rank 0 the tokenizer. Collective (DeepSpeed's barriers, ZeRO-3's gathers); a directory of
    an earlier save of the same step (a run restarted over its own directory) is removed first."""
    tag_dir, rank = files.tag_dir, dist.get_rank()
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)
    dist.barrier()
    with routing_checkpoint_writes(engine, files.add):
        engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, save_latest=False)
    files.add(_rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        files.add(None, tag_dir / TOKENIZER_FILE, lambda _, path: shutil.copyfile(tokenizer_file, path))


def commit(files: RankFiles, state: RunState, keep: int, keep_every: int | None, device, group=None,
           protect: set[str] = frozenset()) -> Path:
    """Once this rank's `files` are written: the ranks agree over `group` that every rank's files are durable; only
    then rank 0 writes distlm_state.json (listing every file with its size) and moves `latest`, both durably, and
    prunes old checkpoints (never one named in `protect`). Collective over `group` (its tensors on `device`). If any
    rank failed, every rank raises the same CheckpointError and the partial directory is removed."""
    tag_dir, rank = files.tag_dir, dist.get_rank()
    files.finish()
    _raise_if_any_failed(files.failure, device, tag_dir, group)  # also the barrier: every rank's files are durable
    failure = _attempt(lambda path: _publish(tag_dir, state), tag_dir / STATE_FILE) if rank == 0 else None
    _raise_if_any_failed(failure, device, tag_dir, group)
    if rank == 0:
        _prune(tag_dir.parent, keep, keep_every, protect)
    dist.barrier(group=group)
    return tag_dir


def _publish(tag_dir: Path, state: RunState) -> None:
    write_atomic(tag_dir / STATE_FILE, json.dumps(asdict(replace(state, files=_list_files(tag_dir))), indent=1),
                 durable=True)
    write_atomic(tag_dir.parent / LATEST_FILE, tag_dir.name, durable=True)


def prunable(tags: list[str], keep: int, keep_every: int | None) -> list[str]:
    """Of complete tags (oldest first), those retention deletes: all but the newest `keep`, except permanent ones
    (a step divisible by keep_every)."""
    def permanent(tag: str) -> bool:
        step = re.fullmatch(r"step(\d+)", tag)
        return bool(keep_every and step and int(step.group(1)) % keep_every == 0)
    return [tag for tag in tags[:-keep] if not permanent(tag)]


def _prune(ckpt_dir: Path, keep: int, keep_every: int | None, protect: set[str] = frozenset()) -> None:
    """Delete what `prunable` names among the complete checkpoints, except those in `protect` (being uploaded).
    A checkpoint being written is not complete, so never a candidate; nor is the newest complete one (keep >= 1)."""
    for old in prunable(complete_tags(ckpt_dir), keep, keep_every):
        if old not in protect:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _attempt(write, path: Path) -> Failure | None:
    try:
        write(path)
        return None
    except Exception as e:  # OSError, or torch's RuntimeError for a failed zip write (errno lost)
        return path, e


def _raise_if_any_failed(failure: Failure | None, device, tag_dir: Path, group=None) -> None:
    """Collective over `group`: if any rank failed, every rank raises the lowest failed rank's description."""
    world = dist.get_world_size()
    first = torch.tensor([dist.get_rank() if failure else world], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    first = int(first.item())
    if first == world:
        return
    message = [_describe(failure, tag_dir) if failure and dist.get_rank() == first else None]
    dist.broadcast_object_list(message, src=first, group=group)
    if dist.get_rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)  # never published; frees the space it took
    raise CheckpointError(f"rank {first}: {message[0]}")


def _describe(failure: Failure, tag_dir: Path) -> str:
    path, error = failure
    try:
        usage = shutil.disk_usage(tag_dir.parent)
        free = f"{usage.free / 1e6:,.0f} MB free"
    except OSError:
        usage, free = None, "free space unknown"
    code = getattr(error, "errno", None)  # torch.save's zip writer raises RuntimeError, without errno
    cause = {errno.ENOSPC: "the disk is full (ENOSPC)", errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
             errno.EFBIG: "the file size limit was hit (EFBIG)"}.get(code, "the write failed")
    if code is None and usage and usage.free < max(2**30, usage.total // 100):
        cause = "the write failed and the disk is (nearly) full"
    latest = find_latest(tag_dir.parent)
    kept = (f"the previous checkpoint {tag_dir.parent / latest} is intact and a restart resumes from it"
            if latest else "there is no earlier checkpoint")
    return (f"saving checkpoint {tag_dir} failed: {cause} writing {path} ({type(error).__name__}: {error}); "
            f"{free} on the filesystem of {tag_dir.parent}; the partial checkpoint was removed and {kept}. "
            f"Free space there (or set run_dir to a larger filesystem) and start the run again")


def load(engine, ckpt_dir: Path, tag: str, from_universal: bool = False) -> RunState:
    """Restore model, optimizer, LR schedule and this rank's RNG; return the run state. `from_universal`:
    read the checkpoint's universal form (it was written at another layout)."""
    tag_dir = Path(ckpt_dir) / tag
    state = read_state(tag_dir)
    if from_universal:
        universal.link_names(tag_dir / universal.UNIVERSAL_DIR, (n for n, _ in engine.module.named_parameters()))
        dist.barrier()
        ckpt_dir, tag = tag_dir, universal.UNIVERSAL_DIR
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = tag_dir / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file() and not from_universal:  # another layout's ranks hold other RNG streams
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
