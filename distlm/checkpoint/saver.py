"""A rank's checkpoint saves over a run: synchronous, or asynchronous with at most one save in flight, and
optionally mirrored to object storage.

Asynchronous (`trainer.async_checkpoint`, the default): `save` runs DeepSpeed's save_checkpoint in the training
thread (its barriers and ZeRO-3's gathers stay where DeepSpeed puts them), but every file it hands over is copied to
host memory and queued (writer.RankFiles); a background thread writes the copies durably, then agrees with the other
ranks' background threads, over a gloo group of its own, that every rank's files are durable, and only then rank 0
publishes the checkpoint (store.commit). The training thread pays for the copy and goes on. Collectives from the
background thread on the training group would interleave with training's, hence the second group (torchtitan does
the same); it is made when the Checkpointer is, on every rank. A crash before the agreement publishes nothing: the
previous checkpoint stays the newest complete one.

A background failure (disk full) reaches every rank as the same CheckpointError at the next agreement point: the
next step (`failed` rides on the step's flags all-reduce), the next save, or `close`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from distlm.checkpoint import store
from distlm.checkpoint.mirror import Uploader
from distlm.checkpoint.store import RunState
from distlm.checkpoint.writer import HostBuffers, RankFiles
from distlm.config import TrainerConfig

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    files: RankFiles
    state: RunState  # a copy: training moves its own on
    started: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Checkpointer:
    """Create it on every rank at the same point (asynchronous: it makes a process group, a collective); call
    `save` and `close` on every rank at the same step."""

    def __init__(self, engine, ckpt_dir: Path, tokenizer_file: Path, t: TrainerConfig):
        self.engine, self.ckpt_dir, self.tokenizer_file = engine, Path(ckpt_dir), Path(tokenizer_file)
        self.keep, self.keep_every, self.asynchronous = t.keep_checkpoints, t.keep_every, t.async_checkpoint
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo") if self.asynchronous else None
        self.buffers = HostBuffers(pinned=engine.device.type == "cuda") if self.asynchronous else None
        self.mirror = Uploader(t.checkpoint_mirror, self.keep, self.keep_every) \
            if t.checkpoint_mirror and self.rank == 0 else None
        self.in_flight: _InFlight | None = None
        self.snapshot_bytes = 0  # host memory the last asynchronous save copied on this rank

    def save(self, state: RunState) -> float:
        """Save a checkpoint of `state.step`; collective. Waits first for the save in flight (logged), and raises
        its CheckpointError if it failed. Asynchronous: returns once this rank's states are copied; synchronous:
        once the checkpoint is published. Returns the seconds spent waiting for the previous save."""
        waited = self.wait()
        files = RankFiles(self.ckpt_dir / store.tag_for_step(state.step), self.rank, self.buffers)
        if not self.asynchronous:
            store.stage(self.engine, self.ckpt_dir, self.tokenizer_file, files)
            store.commit(files, state, self.keep, self.keep_every, self.engine.device, protect=self._protected())
            self._mirror(files.tag_dir)
            return waited
        job = _InFlight(files, copy.deepcopy(state))
        threading.Thread(target=self._write, args=(job,), name=f"distlm-checkpoint-{files.tag_dir.name}",
                         daemon=True).start()  # writes each file as soon as it is copied
        try:
            store.stage(self.engine, self.ckpt_dir, self.tokenizer_file, files)
        finally:
            files.close()
            self.in_flight = job
        self.snapshot_bytes = files.snapshot_bytes
        return waited

    def _write(self, job: _InFlight) -> None:
        try:
            job.files.write_staged()
            store.commit(job.files, job.state, self.keep, self.keep_every, torch.device("cpu"), self.group,
                         protect=self._protected())
            if self.rank == 0:
                log.info("step %d: checkpoint %s complete (written in the background in %.1fs)", job.state.step,
                         job.files.tag_dir, time.perf_counter() - job.started)
            self._mirror(job.files.tag_dir)
        except BaseException as e:  # the CheckpointError every rank got from the agreement, raised at the next one
            job.error = e
        finally:
            job.done.set()

    @property
    def failed(self) -> bool:
        """The save in flight has failed (known on every rank once the ranks' background threads agreed)."""
        job = self.in_flight
        return job is not None and job.done.is_set() and job.error is not None

    def wait(self) -> float:
        """Return when no save is in flight, raising the CheckpointError of one that failed; the seconds waited.
        Every rank calls it at the same step (their background threads finish together: they agree)."""
        job, self.in_flight = self.in_flight, None
        if job is None:
            return 0.0
        start = time.perf_counter()
        if not job.done.is_set():
            if self.rank == 0:
                log.info("waiting for the checkpoint of step %d to be written", job.state.step)
            job.done.wait()
            if self.rank == 0:
                log.info("waited %.1fs for the checkpoint of step %d", time.perf_counter() - start, job.state.step)
        if job.error is not None:
            raise job.error
        return time.perf_counter() - start

    def close(self) -> None:
        """At the end of training (also a stop for SIGTERM or a resize): the save in flight and the mirror's
        upload finish first."""
        self.wait()
        if self.mirror:
            self.mirror.wait()

    def _protected(self) -> set[str]:
        return self.mirror.busy() if self.mirror else set()

    def _mirror(self, tag_dir: Path) -> None:
        if self.mirror:
            self.mirror.submit(tag_dir)
