"""A copy of every complete checkpoint in object storage (`trainer.checkpoint_mirror`, any fsspec URL), and a run's
start from it when run_dir has no checkpoint (a new cluster, a lost disk).

Layout under the URL, as in run_dir/checkpoints: `<tag>/<every file the checkpoint lists>`, then
`<tag>/distlm_state.json` last (a mirrored tag without it is incomplete and never used), then `latest`. Rank 0
uploads each checkpoint after it is published, on a thread of its own (`Uploader`), so neither training nor the
next save waits for the upload; the mirror keeps the checkpoints retention keeps (trainer.keep_checkpoints,
keep_every). The upload of the newest checkpoint supersedes a queued one of an older checkpoint.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import threading
import time
from pathlib import Path

import fsspec

from distlm.checkpoint import store
from distlm.checkpoint.store import LATEST_FILE, STATE_FILE
from distlm.config import CheckpointError
from distlm.files import write_atomic

log = logging.getLogger(__name__)


def _filesystem(url: str):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def complete_tags(fs, root: str) -> list[str]:
    """Mirrored tags whose upload finished, oldest first."""
    if not fs.exists(root):
        return []
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    return [n for n in names if n.startswith("step") and fs.exists(f"{root}/{n}/{STATE_FILE}")]


def upload(tag_dir: Path, url: str, keep: int, keep_every: int | None) -> None:
    """Copy a published checkpoint to the mirror (its files, then its state file, then `latest`), then delete the
    mirrored checkpoints retention would not keep."""
    fs, root = _filesystem(url)
    state = store.verify(tag_dir)
    dest = f"{root}/{tag_dir.name}"
    if fs.exists(f"{dest}/{STATE_FILE}"):
        fs.rm(f"{dest}/{STATE_FILE}")  # an earlier upload of this step: incomplete until this one ends
    for name in sorted(state.files):
        fs.makedirs(posixpath.dirname(f"{dest}/{name}"), exist_ok=True)
        fs.put_file(str(tag_dir / name), f"{dest}/{name}")
    fs.put_file(str(tag_dir / STATE_FILE), f"{dest}/{STATE_FILE}")
    fs.pipe_file(f"{root}/{LATEST_FILE}", tag_dir.name.encode())
    for old in store.prunable(complete_tags(fs, root), keep, keep_every):
        fs.rm(f"{root}/{old}", recursive=True)


def fetch_newest(url: str, ckpt_dir: Path) -> str | None:
    """Download the mirror's newest complete checkpoint that verifies (the one `latest` names first) into
    `ckpt_dir`; its tag, or None when the mirror has none. Several processes may call it at once: each downloads
    into a folder of its own and the first rename wins."""
    fs, root = _filesystem(url)
    tags = complete_tags(fs, root)
    latest = fs.cat_file(f"{root}/{LATEST_FILE}").decode().strip() if fs.exists(f"{root}/{LATEST_FILE}") else None
    order = ([latest] if latest in tags else []) + [t for t in reversed(tags) if t != latest]
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for tag in order:
        start = time.perf_counter()
        tmp = ckpt_dir / f".{tag}.download{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            fs.get_file(f"{root}/{tag}/{STATE_FILE}", str(tmp / STATE_FILE))
            for name in sorted(store.read_state(tmp).files):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{tag}/{name}", str(tmp / name))
            store.verify(tmp)
        except (CheckpointError, OSError) as e:
            log.warning("mirrored checkpoint %s/%s does not verify (%s); trying an older one", url, tag, e)
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            os.rename(tmp, ckpt_dir / tag)
        except OSError:  # another process of this run downloaded it first
            shutil.rmtree(tmp, ignore_errors=True)
        write_atomic(ckpt_dir / LATEST_FILE, tag)
        log.info("run_dir has no checkpoint: downloaded %s from the mirror %s in %.1fs", tag, url,
                 time.perf_counter() - start)
        return tag
    return None


class Uploader:
    """Rank 0's background uploads: `submit(tag_dir)` after a checkpoint is published; `busy()` names the tags that
    must not be pruned meanwhile; `wait()` returns when nothing is left to upload. A failed upload is logged and
    training goes on (the next checkpoint is uploaded again in full)."""

    def __init__(self, url: str, keep: int, keep_every: int | None):
        self.url, self.keep, self.keep_every = url, keep, keep_every
        self._pending: Path | None = None
        self._uploading: Path | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="distlm-checkpoint-mirror", daemon=True).start()

    def submit(self, tag_dir: Path) -> None:
        with self._changed:
            self._pending = tag_dir
            self._changed.notify_all()

    def busy(self) -> set[str]:
        with self._changed:
            return {p.name for p in (self._pending, self._uploading) if p is not None}

    def wait(self) -> None:
        with self._changed:
            if self._pending or self._uploading:
                log.info("waiting for the upload of %s to the mirror %s", (self._uploading or self._pending).name,
                         self.url)
            self._changed.wait_for(lambda: self._pending is None and self._uploading is None)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None)
                self._uploading, self._pending = self._pending, None
            start = time.perf_counter()
            try:
                upload(self._uploading, self.url, self.keep, self.keep_every)
                log.info("checkpoint %s mirrored to %s in %.1fs", self._uploading.name, self.url,
                         time.perf_counter() - start)
            except Exception as e:  # storage unreachable, credentials: training goes on, the next upload retries
                log.error("uploading checkpoint %s to the mirror %s failed: %s: %s", self._uploading, self.url,
                          type(e).__name__, e)
            with self._changed:
                self._uploading = None
                self._changed.notify_all()
