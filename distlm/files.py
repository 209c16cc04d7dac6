"""Writing files so that a crash never leaves a half-written one under its real name, and naming a file's
content. Shared by preprocessing, the shards, checkpoints and exports; no torch."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` (same directory: the rename is atomic), renamed to `path` when the block
    ends without an error and removed when it raises. Readers see the old file or the whole new one. `durable`:
    the file is fsync'd before the rename and the directory after it, so the new file survives a power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's writes (or a directory's entries: renames) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path` through `replacing`."""
    with replacing(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
