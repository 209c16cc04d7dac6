"""Shards of packed samples, the layout of one sample's record in them, and the manifest of a dataset.

A data directory holds `train-00000.tar`, ..., `val-00000.tar`, `tokenizer.json`, `stats.json` and
`manifest.json`. The manifest is written last, so a directory with a manifest is complete; everything is
written under a temporary name and renamed, so a crash never leaves a file that looks finished but is not.

Format 3. A shard is a plain uncompressed tar (standard tools list, copy and extract it) with one member,
`train-00003.records`: its samples as fixed-size records, back to back. Record i starts at byte
512 + i * R of the shard (R = RecordFormat.size), so a reader fetches exactly the samples it needs with
offset reads (os.pread locally, range requests on object storage) and never parses tar headers. A record:
  tokens        sample_len little-endian token ids (uint16 when the vocabulary fits, else uint32)
  doc starts    with data.keep_doc_boundaries: sample_len bits (np.packbits), bit p = a document starts at p
  crc32         of the shard's name, the bytes above and the record's index: a changed or misplaced sample
                fails its own check, so a rank verifies just what it reads
Format 2 (one tar member per sample, whole-shard sha256) is refused: preprocess again.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from distlm.files import file_sha256, replacing, write_atomic

FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TAR_BLOCK = 512
RECORDS_OFFSET = TAR_BLOCK   # one 512-byte ustar header precedes the records


class ShardError(RuntimeError):
    """A shard that is missing, corrupt or differs from the manifest; the message names it (and the sample)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


@dataclass(frozen=True)
class RecordFormat:
    """How one sample is laid out in a shard (see the module docstring)."""
    sample_len: int
    dtype: np.dtype
    doc_boundaries: bool

    @property
    def token_bytes(self) -> int:
        return self.sample_len * self.dtype.itemsize

    @property
    def bit_bytes(self) -> int:
        return -(-self.sample_len // 8) if self.doc_boundaries else 0

    @property
    def size(self) -> int:
        return self.token_bytes + self.bit_bytes + 4

    def byte_range(self, first: int, end: int) -> tuple[int, int]:
        """Where records [first, end) lie in their shard."""
        return RECORDS_OFFSET + first * self.size, RECORDS_OFFSET + end * self.size

    def shard_bytes(self, samples: int) -> int:
        """The whole tar: header, records padded to a block, two zero blocks that end the archive."""
        return RECORDS_OFFSET + -(-samples * self.size // TAR_BLOCK) * TAR_BLOCK + 2 * TAR_BLOCK

    def encode(self, stem: str, samples: np.ndarray, doc_starts: np.ndarray | None) -> np.ndarray:
        """Records [n, size] (uint8) of samples [n, sample_len] and their document starts (bool [n, sample_len])."""
        n = len(samples)
        records = np.empty((n, self.size), dtype=np.uint8)
        tokens = np.ascontiguousarray(samples, dtype=self.dtype.newbyteorder("<"))
        records[:, :self.token_bytes] = tokens.view(np.uint8).reshape(n, self.token_bytes)
        if self.doc_boundaries:
            records[:, self.token_bytes: self.size - 4] = np.packbits(doc_starts, axis=1)
        records[:, -4:] = self.checksums(stem, records, np.arange(n)).view(np.uint8).reshape(n, 4)
        return records

    def checksums(self, stem: str, records: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """crc32 of (stem, record payload, index) for each record row; little-endian uint32."""
        seed, end = zlib.crc32(stem.encode()), self.size - 4
        return np.array([zlib.crc32(int(i).to_bytes(8, "little"), zlib.crc32(row[:end], seed))
                         for row, i in zip(records, indices)], dtype="<u4")

    def decode(self, where: str, stem: str, records: np.ndarray, indices: np.ndarray,
               verify: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [k, sample_len] and document starts (bool [k, sample_len], or None) of records [k, size] that are
        samples `indices` of shard `stem`. ShardError names the shard and the first sample whose crc32 differs."""
        if verify:
            stored = records[:, -4:].copy().view("<u4").ravel()
            bad = np.flatnonzero(self.checksums(stem, records, indices) != stored)
            if len(bad):
                raise ShardError(f"shard {where}: sample {int(indices[bad[0]])} ({stem}/{int(indices[bad[0]])}) fails "
                                 f"its crc32 ({len(bad)} of the {len(indices)} samples read do): the shard changed "
                                 f"since preprocessing; restore it or preprocess again")
        tokens = np.ascontiguousarray(records[:, :self.token_bytes]).view(self.dtype.newbyteorder("<"))
        tokens = tokens.astype(self.dtype, copy=False).reshape(len(records), self.sample_len)
        if not self.doc_boundaries:
            return tokens, None
        bits = np.unpackbits(records[:, self.token_bytes: self.size - 4], axis=1, count=self.sample_len)
        return tokens, bits.astype(bool)


def _tar_header(member: str, size: int) -> bytes:
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode = size, 0, 0o644   # a fixed mtime makes the shard byte-reproducible
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    assert len(header) == RECORDS_OFFSET, member   # names are short: never a long-name extension header
    return header


def write_shard(path: Path, samples: np.ndarray, doc_starts: np.ndarray | None = None) -> "ShardInfo":
    """Write samples [n, sample_len] (and, if given, where documents start: bool [n, sample_len]) as one
    shard, atomically (a temporary name, then a rename)."""
    stem = path.name.removesuffix(".tar")
    fmt = RecordFormat(samples.shape[1], samples.dtype, doc_starts is not None)
    records = fmt.encode(stem, samples, doc_starts)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(_tar_header(f"{stem}.records", records.size))
        f.write(records.data)
        f.write(bytes(fmt.shard_bytes(len(samples)) - RECORDS_OFFSET - records.size))   # padding + end of archive
    return ShardInfo(name=path.name, samples=len(samples), tokens=int(samples.size), bytes=path.stat().st_size)


def check_shard(path: Path, shard: "ShardInfo", fmt: RecordFormat) -> None:
    """Read a whole local shard: its size, tar header and every sample's crc32. ShardError names what differs."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing")
    data = path.read_bytes()
    if len(data) != fmt.shard_bytes(shard.samples) or data[:RECORDS_OFFSET] != \
            _tar_header(f"{shard.name.removesuffix('.tar')}.records", shard.samples * fmt.size):
        raise ShardError(f"shard {path} has {len(data)} bytes or a tar header other than {MANIFEST_FILE} implies "
                         f"({shard.samples} samples of {fmt.size} bytes): restore it or preprocess again")
    first, end = fmt.byte_range(0, shard.samples)
    records = np.frombuffer(data, dtype=np.uint8, count=end - first, offset=first).reshape(shard.samples, fmt.size)
    fmt.decode(str(path), shard.name.removesuffix(".tar"), records, np.arange(shard.samples), verify=True)


@dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    bytes: int


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
    doc_boundaries: bool = False   # records carry document starts
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

    @property
    def record(self) -> RecordFormat:
        return RecordFormat(self.sample_len, np.dtype(self.dtype), self.doc_boundaries)

    def shards(self, split: str) -> list[ShardInfo]:
        return self._split(split).shards

    def num_samples(self, split: str) -> int:
        return self._split(split).samples

    def shard_path(self, shard: ShardInfo) -> Path:
        return Path(self.data_dir) / shard.name

    def shard_url(self, shard: ShardInfo, template: str | None = None) -> str:
        """Where the loader reads a shard: `template` with {name} and {dir} (a local path or any fsspec URL that
        allows range reads, e.g. s3://bucket/set/{name}), else data_dir/name."""
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
        """Read every shard whole (size, tar header, every sample's crc32) and re-hash the tokenizer; raise
        ShardError naming the first shard (and sample) that differs."""
        for split in self.splits:
            for shard in self.shards(split):
                check_shard(self.shard_path(shard), shard, self.record)
        if not self.tokenizer_path.is_file() or file_sha256(self.tokenizer_path) != self.tokenizer.sha256:
            raise ShardError(f"tokenizer {self.tokenizer_path} is missing or does not match its sha256")

    # --- storage ---
    def save(self, data_dir: str | Path) -> None:
        record = asdict(self)
        record.pop("data_dir")
        write_atomic(Path(data_dir) / MANIFEST_FILE, json.dumps(record, indent=1) + "\n")
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
            raise ValueError(f"{url} has shard format version {record.get('format_version')}, this distlm reads "
                             f"version {FORMAT_VERSION} (samples at fixed offsets, a crc32 per sample): preprocess "
                             f"the data again (`distlm preprocess` with the same data.inputs)")
        record["tokenizer"] = TokenizerInfo(**record["tokenizer"])
        record["splits"] = {
            name: SplitInfo(samples=s["samples"], tokens=s["tokens"], shards=[ShardInfo(**x) for x in s["shards"]])
            for name, s in record["splits"].items()
        }
        return cls(**record, data_dir=data_dir if is_url(data_dir) else Path(data_dir))
