"""WebDataset tar shards of packed samples, and the manifest that describes a preprocessed dataset.

A data directory holds `train-00000.tar`, ..., `val-00000.tar`, ..., `tokenizer.json`, `stats.json` and
`manifest.json`. The manifest is written last, so a directory with a manifest is complete; everything is
written under a temporary name and renamed, so a crash never leaves a file that looks finished but is not.

Sample i of `train-00003.tar` has key `train-00003-00000i`: its tokens as `tokens.npy` (uint16 when the
vocabulary fits, else uint32) and, with `data.keep_doc_boundaries`, the positions where documents start
in it as `docstarts.npy`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from distlm.data.tokenizer import file_sha256, save_bytes

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TAR_BLOCK = 512


class ShardError(RuntimeError):
    """A shard that is missing, corrupt or differs from the manifest; the message names it."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def is_url(path: str | Path) -> bool:
    return "://" in str(path) or str(path).startswith("pipe:")


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype=dtype))
    return buffer.getvalue()[: -length * dtype.itemsize]


def sample_tar_bytes(sample_len: int, dtype: np.dtype) -> int:
    """Bytes one sample's tokens take in a tar: a 512-byte header plus the .npy padded to 512 bytes."""
    payload = len(_npy_header(dtype, sample_len)) + sample_len * dtype.itemsize
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


def write_shard(path: Path, samples: np.ndarray, doc_starts: list[np.ndarray] | None = None) -> "ShardInfo":
    """Write samples [n, sample_len] (and each one's document start positions) as one tar, atomically."""
    import webdataset as wds  # here: it imports torch (2 s), which read and tokenize workers never need

    stem = path.name.removesuffix(".tar")
    tmp = path.with_name(path.name + ".tmp")
    header = _npy_header(samples.dtype, samples.shape[1])  # the same for every row: encode it once
    with wds.TarWriter(str(tmp), mtime=0) as writer:  # a fixed mtime makes the tar byte-reproducible
        for i, sample in enumerate(samples):
            record = {"__key__": f"{stem}-{i:06d}", "tokens.npy": header + sample.tobytes()}
            if doc_starts is not None:
                buffer = io.BytesIO()
                np.save(buffer, doc_starts[i].astype(np.int32))
                record["docstarts.npy"] = buffer.getvalue()
            writer.write(record)
    os.replace(tmp, path)
    return ShardInfo(name=path.name, samples=len(samples), tokens=int(samples.size),
                     bytes=path.stat().st_size, sha256=file_sha256(path))


@dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    samples: int
    tokens: int   # tokens stored in the samples (samples * sample_len)
    shards: list[ShardInfo]


@dataclass
class TokenizerInfo:
    file: str
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None


@dataclass
class Manifest:
    fingerprint: str        # hash of the inputs and the config that produced this dataset
    seq_len: int
    sample_len: int         # seq_len + 1: inputs and their shifted targets
    dtype: str              # numpy dtype of the stored tokens
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    stats: dict[str, Any]   # what preprocessing read, removed and produced (also in stats.json)
    inputs: list[str]
    config: dict[str, Any]  # the data section of the config
    doc_boundaries: bool = False   # samples carry docstarts.npy
    format_version: int = FORMAT_VERSION
    data_dir: Path | str | None = field(default=None, repr=False, compare=False)  # where it lives; not saved

    # --- conveniences for the trainer ---
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer.sha256

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.data_dir) / self.tokenizer.file

    def shards(self, split: str) -> list[ShardInfo]:
        return self._split(split).shards

    def num_samples(self, split: str) -> int:
        return self._split(split).samples

    def shard_path(self, shard: ShardInfo) -> Path:
        return Path(self.data_dir) / shard.name

    def shard_url(self, shard: ShardInfo, template: str | None = None) -> str:
        """Where the loader opens a shard: `template` with {name} (e.g. a `pipe:` command), else data_dir/name."""
        if template:
            return template.format(name=shard.name, dir=self.data_dir)
        return f"{str(self.data_dir).rstrip('/')}/{shard.name}" if is_url(self.data_dir) else str(self.shard_path(shard))

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise KeyError(f"no split '{split}' in {self.data_dir}; splits: {sorted(self.splits)}")
        return self.splits[split]

    # --- checks ---
    def file_problems(self) -> list[str]:
        """Cheap check of the files the manifest lists: shards exist with their sizes, the tokenizer's hash."""
        problems = []
        for split in self.splits:
            for shard in self.shards(split):
                path = self.shard_path(shard)
                if not path.is_file():
                    problems.append(f"missing shard {path}")
                elif path.stat().st_size != shard.bytes:
                    problems.append(f"shard {path} has {path.stat().st_size} bytes, manifest says {shard.bytes}")
        if not self.tokenizer_path.is_file() or file_sha256(self.tokenizer_path) != self.tokenizer.sha256:
            problems.append(f"tokenizer {self.tokenizer_path} is missing or does not match its sha256")
        return problems

    def verify(self) -> None:
        """Re-hash every shard and the tokenizer; raise ShardError naming the first one that differs."""
        for split in self.splits:
            for shard in self.shards(split):
                path = self.shard_path(shard)
                if not path.is_file():
                    raise ShardError(f"shard {path} is missing")
                if file_sha256(path) != shard.sha256:
                    raise ShardError(f"shard {path} does not match its sha256 in {MANIFEST_FILE}")
        if not self.tokenizer_path.is_file() or file_sha256(self.tokenizer_path) != self.tokenizer.sha256:
            raise ShardError(f"tokenizer {self.tokenizer_path} is missing or does not match its sha256")

    # --- storage ---
    def save(self, data_dir: str | Path) -> None:
        record = asdict(self)
        record.pop("data_dir")
        save_bytes((json.dumps(record, indent=1) + "\n").encode("utf-8"), Path(data_dir) / MANIFEST_FILE)
        self.data_dir = Path(data_dir)

    @classmethod
    def load(cls, data_dir: str | Path) -> "Manifest":
        """The manifest of a local data directory or of one at an fsspec URL (s3://bucket/set, ...)."""
        url = f"{str(data_dir).rstrip('/')}/{MANIFEST_FILE}"
        try:
            with fsspec.open(url, "r", encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no {MANIFEST_FILE} in '{data_dir}': run `distlm preprocess` first") from None
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{url} has format version {record.get('format_version')}, this code reads "
                             f"{FORMAT_VERSION}: preprocess the data again")
        record["tokenizer"] = TokenizerInfo(**record["tokenizer"])
        record["splits"] = {
            name: SplitInfo(samples=s["samples"], tokens=s["tokens"], shards=[ShardInfo(**x) for x in s["shards"]])
            for name, s in record["splits"].items()
        }
        return cls(**record, data_dir=data_dir if is_url(data_dir) else Path(data_dir))
