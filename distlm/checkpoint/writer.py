"""How one rank writes its files of a checkpoint: durably, either at once from the live tensors or in the
background from a copy in host memory.

Every file is written the same way (`write_durably`): into a staging folder beside it under its own name (torch.save
names the zip archive inside a file after the file, so the bytes are those of a direct save), fsync'd, then renamed
into place; after the last file the folder is fsync'd too. A rank's files of one checkpoint are a `RankFiles`:
synchronous, each file is written as soon as DeepSpeed hands it over; asynchronous, its tensors are copied to host
memory (`snapshot`; pinned on CUDA) when DeepSpeed hands it over, and `write_staged`, on a background thread, writes
the copies while training goes on. The first failure is recorded, not raised (store.py makes every rank agree on it
before anything is published), and nothing more is written after it.
"""

from __future__ import annotations

import copy
import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distlm.files import fsync_path

Save = Callable[[Any, str], None]  # writes an object to a path: DeepSpeed's checkpoint writer, torch.save
Failure = tuple[Path, BaseException]  # the file being written and what went wrong


def write_durably(save: Save, state: Any, path: Path, staging: Path) -> None:
    """`save(state, staging/name)`, fsync, rename to `path`: `path` is absent or whole, also after a crash."""
    staging.mkdir(exist_ok=True)
    tmp = staging / path.name
    try:
        save(state, str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class HostBuffers:
    """Host memory for snapshots, kept for the next save: pinned memory (`pinned`, for copies from a GPU) is slow to
    allocate (cudaHostAlloc), and the same files come back at every save with the same storage sizes."""

    def __init__(self, pinned: bool = False):
        self.pinned = pinned
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.UntypedStorage:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned).untyped_storage()

    def give(self, storages) -> None:
        with self._lock:
            for s in storages:
                self._free.setdefault(s.nbytes(), []).append(s)


@dataclass
class Snapshot:
    """A state dict's copy whose tensors are in host memory, and what the copy took."""
    state: Any
    storages: list[torch.UntypedStorage] = field(default_factory=list)
    copied: torch.cuda.Event | None = None  # recorded after the copies from the GPU (non-blocking) were queued

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages)

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()


ATOMIC = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


class _HostCopier:
    """Copies containers (dicts of any kind, lists, tuples) and tensors; deep-copies any other object. A tensor is
    copied storage by storage: a storage that several tensors share is copied once, whole (torch.save writes each
    storage once, whole), and each copy is a view of it with the original's offset, shape and stride; its type
    (Parameter), requires_grad and Python attributes are kept. torch.save then writes from the copy the bytes it
    would have written from the original. An object met twice is copied once (pickle writes it once)."""

    def __init__(self, buffers: HostBuffers):
        self.buffers = buffers
        self.memo: dict[int, Any] = {}  # id of an original -> its copy (copy.deepcopy's memo too)
        self.storages: dict[int, torch.UntypedStorage] = {}  # the original storage's StorageImpl -> its copy
        self.from_gpu = False

    def copy(self, x: Any) -> Any:
        if isinstance(x, ATOMIC):
            return x
        if id(x) in self.memo:
            return self.memo[id(x)]
        if isinstance(x, torch.Tensor):
            new = self._tensor(x)
        elif isinstance(x, dict):
            new = copy.copy(x)  # the same kind of mapping (OrderedDict ...), its values replaced below
            self.memo[id(x)] = new
            for k, v in x.items():
                new[k] = self.copy(v)
        elif type(x) is list:
            new = []
            self.memo[id(x)] = new
            new.extend(self.copy(v) for v in x)
        elif type(x) is tuple:
            new = tuple(self.copy(v) for v in x)
        elif isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
            new = type(x)(*(self.copy(v) for v in x))
        else:
            new = copy.deepcopy(x, self.memo)  # config objects, enums, DeepSpeed's small records
        self.memo[id(x)] = new
        return new

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized \
                or t.device.type == "meta":
            return copy.deepcopy(t, self.memo)  # none in DeepSpeed's checkpoints: a copy on its own device
        storage = t.untyped_storage()
        host = self.storages.get(storage._cdata)
        if host is None:
            gpu = storage.device.type == "cuda"
            host = self.buffers.take(storage.nbytes())
            host.copy_(storage, non_blocking=gpu and self.buffers.pinned)
            self.storages[storage._cdata] = host
            self.from_gpu |= gpu
        with torch.no_grad():
            new = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if type(t) is torch.nn.Parameter:
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        elif t.requires_grad:
            new.requires_grad_()
        if t.__dict__:
            new.__dict__.update(self.copy(dict(t.__dict__)))
        return new


def snapshot(state: Any, buffers: HostBuffers) -> Snapshot:
    """A copy of `state` with every tensor in host memory (see _HostCopier), made now: what training changes
    afterwards is not in it."""
    copier = _HostCopier(buffers)
    copied = copier.copy(state)
    event = None
    if copier.from_gpu:
        event = torch.cuda.Event()
        event.record()
    return Snapshot(copied, list(copier.storages.values()), event)


class RankFiles:
    """This rank's files of one checkpoint (the tag directory `tag_dir`). `add` takes each file as DeepSpeed (through
    compat.deepspeed.routing_checkpoint_writes) or distlm hands it over: synchronous, it is written at once;
    asynchronous, it is copied to host memory and queued for `write_staged`, which a background thread runs until
    `close`. `failure` is the first failed write (or copy); nothing is written after it."""

    def __init__(self, tag_dir: Path, rank: int, buffers: HostBuffers | None = None):
        self.tag_dir = Path(tag_dir)
        self.buffers = buffers  # None: synchronous
        self.staging = self.tag_dir / f".rank{rank:05d}.partial"
        self.failure: Failure | None = None
        self.snapshot_bytes = 0
        self._queue: queue.Queue[tuple[Snapshot, Path, Save] | None] = queue.Queue()

    @property
    def asynchronous(self) -> bool:
        return self.buffers is not None

    def add(self, state: Any, path: Path, save: Save = torch.save) -> None:
        if self.failure:
            return
        path = Path(path)
        try:
            if self.asynchronous:
                copied = snapshot(state, self.buffers)
                self.snapshot_bytes += copied.nbytes
                self._queue.put((copied, path, save))
            else:
                write_durably(save, state, path, self.staging)
        except Exception as e:  # OSError, torch's RuntimeError for a failed zip write (errno lost), out of memory
            self.failure = (path, e)

    def close(self) -> None:
        """No more files: `write_staged` returns once it has written the queued ones."""
        self._queue.put(None)

    def write_staged(self) -> None:
        """Write the queued copies as they come, until `close` (the background thread)."""
        while (item := self._queue.get()) is not None:
            copied, path, save = item
            if self.failure is None:
                try:
                    copied.wait()
                    write_durably(save, copied.state, path, self.staging)
                except Exception as e:
                    self.failure = (path, e)
            self.buffers.give(copied.storages)
            del copied, item

    def finish(self) -> None:
        """After the last file: the staging folder removed, the tag directory's entries (the renames) durable."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.failure is None and self.tag_dir.is_dir():
            try:
                fsync_path(self.tag_dir)
            except OSError as e:
                self.failure = (self.tag_dir, e)
