"""What an unfinished preprocessing run keeps, so that running it again redoes only what is missing.

data.dir/.work-<fingerprint>/ holds the trained tokenizer, every read block's metadata, every tokenize
part's tokens and band keys, and a record of every finished shard. Each file is written under a temporary
name and renamed, so what is there is complete. The directory is removed once the manifest is written;
one left by a run of other inputs or another config is removed when a run starts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from distlm.data.preprocess import stages
from distlm.data.preprocess.tokenizer import save_tokenizer

WORK_PREFIX = ".work-"


def part_bounds(text_bytes: np.ndarray, bytes_per_part: int) -> np.ndarray:
    """Document boundaries [0, ..., n] of a block's tokenize parts: a document belongs to the part of
    bytes_per_part that holds its first byte, so parts split by text size, not document count (a few long
    documents still spread over every core); a part holds at most bytes_per_part + its last document."""
    first_byte = np.cumsum(text_bytes) - text_bytes
    part = first_byte // bytes_per_part
    return np.concatenate([[0], np.flatnonzero(np.diff(part)) + 1, [len(text_bytes)]]) if len(part) else np.zeros(1, np.int64)


@dataclass
class BlockResult:
    """One read block on the driver: its metadata, and per tokenize part the refs of its tokens and band
    keys in Ray's object store and its token lengths."""
    index: int
    meta: dict
    parts: list[tuple] = field(default_factory=list)
    part_lengths: dict[int, np.ndarray] = field(default_factory=dict)
    reused: bool = False   # loaded from an interrupted run's work directory

    @classmethod
    def from_cache(cls, cached: tuple[dict, list[Path]], index: int, work: "WorkDir") -> "BlockResult":
        meta, part_files = cached
        result = cls(index=index, meta=meta, reused=True)
        for k, path in enumerate(part_files):
            tokens, keys = stages.load_part.remote(str(path))
            result.parts.append((tokens, keys))
            with np.load(path) as saved:
                result.part_lengths[k] = saved["lengths"]
        return result

    def set_lengths(self, part: int, lengths: np.ndarray) -> None:
        self.part_lengths[part] = lengths

    def lengths(self) -> np.ndarray:
        """Token count of every document of the block (without special tokens)."""
        parts = [self.part_lengths[k] for k in range(len(self.parts))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def token_count(self) -> int:
        return int(sum(x.sum() for x in self.part_lengths.values()))


@dataclass
class WorkDir:
    root: Path
    bytes_per_part: int   # data.tokenize_task_mb; part of the fingerprint, so a work dir's parts always match it

    @classmethod
    def open(cls, data_dir: Path, fingerprint: str, bytes_per_part: int) -> "WorkDir":
        root = data_dir / f"{WORK_PREFIX}{fingerprint[:16]}"
        for stale in data_dir.glob(WORK_PREFIX + "*"):
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
        work = cls(root, bytes_per_part)
        for sub in (work.blocks_dir, work.shards_dir):
            sub.mkdir(parents=True, exist_ok=True)
        return work

    @property
    def blocks_dir(self) -> Path:
        return self.root / "blocks"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def part_path(self, block: int, part: int) -> Path:
        return self.blocks_dir / f"{block:05d}-{part:05d}.tokens.npz"

    def _meta_path(self, block: int) -> Path:
        return self.blocks_dir / f"{block:05d}.meta.npz"

    def save_meta(self, block: int, meta: dict) -> None:
        info = {k: meta[k] for k in ("units", "removed", "removed_bytes", "bad_files")}
        stages.save_npz(self._meta_path(block), digests=meta["digests"], text_bytes=meta["text_bytes"],
                        pii=meta["pii"], info=np.array(json.dumps(info)))

    def load_block(self, block: int) -> tuple[dict, list[Path]] | None:
        """(metadata, part files) of a block an earlier run finished tokenizing, else None."""
        path = self._meta_path(block)
        if not path.is_file():
            return None
        with np.load(path) as saved:
            meta = {"digests": saved["digests"], "text_bytes": saved["text_bytes"], "pii": saved["pii"],
                    **json.loads(str(saved["info"]))}
        parts = [self.part_path(block, k) for k in range(len(self.part_bounds(meta)) - 1)]
        return (meta, parts) if all(p.is_file() for p in parts) else None

    def part_bounds(self, meta: dict) -> np.ndarray:
        """Document boundaries of a read block's tokenize parts."""
        return part_bounds(meta["text_bytes"], self.bytes_per_part)

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        save_tokenizer(tokenizer, self.root / "tokenizer.json")

    def load_tokenizer(self) -> Tokenizer | None:
        path = self.root / "tokenizer.json"
        return Tokenizer.from_file(str(path)) if path.is_file() else None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
