"""Shards of packed samples, the layout of one sample in them, and the manifest of a dataset.

A data directory holds `train-00000.tar`, ..., `val-00000.tar`, `tokenizer.json`, `stats.json` and
`manifest.json`. The manifest is written last, so a directory with a manifest is complete; everything is
written under a temporary name and renamed, so a crash never leaves a file that looks finished but is not.

Format 4: WebDataset samples at fixed offsets. A shard is a plain uncompressed tar in which every training
sequence is one WebDataset sample, key `train-00003-000017` (shard stem, sample index), with members
  KEY.tokens.npy                 the sample's sample_len token ids, a standard .npy (little-endian uint16 when
                                 the vocabulary fits, else uint32)
  KEY.doc_starts.packbits.npy    with data.keep_doc_boundaries: np.packbits of "a document starts at this
                                 token" (np.unpackbits(x, count=sample_len) gives one 0/1 per token)
so `wds.WebDataset`, `ray.data.read_webdataset` and `datasets.load_dataset("webdataset", ...)` give one row
per sequence, decoded by their own .npy decoders. Every sample has the same byte size (SampleLayout.stride),
so sample i starts at byte i * stride and a reader fetches exactly the bytes it needs with offset reads
(os.pread locally, range requests on object storage), never parsing tar headers.

Integrity: a crc32 per block of `crc_block` tokens of each sample (1,024 by default) over the sample's key,
the block's token bytes, its document-start bytes and the block's number: a changed or misplaced sample fails,
and a context-parallel rank that reads a slice of every sample verifies just the blocks it reads. The
crc32s are a table at the end of the shard, one member named `__crc32__` (raw little-endian uint32
[samples, blocks]): a name without a dot that WebDataset readers skip. Formats 2 and 3 are refused:
preprocess again.
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

FORMAT_VERSION = 4
MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TAR_BLOCK = 512
CRC_BLOCK = 1024             # tokens per crc32 (a multiple of 8: a block's document starts are whole bytes)
CRC_MEMBER = "__crc32__"     # WebDataset readers skip a member named __...__ without an extension
TOKENS_FIELD = "tokens.npy"
STARTS_FIELD = "doc_starts.packbits.npy"


class ShardError(RuntimeError):
    """A shard that is missing, corrupt or differs from the manifest; the message names it (and the sample)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def sample_key(stem: str, index: int) -> str:
    """The WebDataset key of sample `index` of shard `stem` (unique across a dataset's shards)."""
    return f"{stem}-{index:06d}"


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy (version 1.0) header of a 1-D array, as numpy writes it: magic, version, the header dict padded
    with spaces to a multiple of 64 bytes. Built here, not by numpy, so shards stay byte-identical across numpy
    versions."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (np.dtype(dtype).newbyteorder("<").str, length)
    total = -(-(10 + len(text) + 1) // 64) * 64
    text = text + " " * (total - 10 - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + (total - 10).to_bytes(2, "little") + text.encode("latin1")


def tar_headers(names: list[str], size: int) -> np.ndarray:
    """ustar headers [len(names), 512] (uint8) of regular files of `size` bytes, mtime 0 (byte-reproducible),
    built from one tarfile header by writing each name and its checksum (tarfile takes ~40 us per header)."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = size, 0, 0o644
    template = np.frombuffer(info.tobuf(format=tarfile.USTAR_FORMAT), dtype=np.uint8)
    assert len(template) == TAR_BLOCK
    headers = np.repeat(template[None], len(names), axis=0)
    encoded = [name.encode() for name in names]
    assert max(map(len, encoded), default=0) <= 100, names[0]   # short names: never a long-name extension header
    width = max(map(len, encoded), default=1)
    headers[:, :100] = 0
    headers[:, :width] = np.frombuffer(b"".join(n.ljust(width, b"\0") for n in encoded), np.uint8).reshape(-1, width)
    headers[:, 148:156] = ord(" ")
    sums = headers.sum(axis=1, dtype=np.int64)
    headers[:, 148:156] = np.frombuffer(b"".join(b"%06o\0 " % s for s in sums.tolist()), np.uint8).reshape(-1, 8)
    return headers


@dataclass(frozen=True)
class SampleLayout:
    """Where each part of a sample lies in its shard (see the module docstring)."""
    sample_len: int
    dtype: np.dtype
    doc_boundaries: bool
    crc_block: int = CRC_BLOCK

    @property
    def token_bytes(self) -> int:
        return self.sample_len * self.dtype.itemsize

    @property
    def bit_bytes(self) -> int:
        return -(-self.sample_len // 8)

    @property
    def blocks(self) -> int:
        return -(-self.sample_len // self.crc_block)

    @property
    def tokens_header(self) -> bytes:
        return npy_header(self.dtype, self.sample_len)

    @property
    def starts_header(self) -> bytes:
        return npy_header(np.dtype(np.uint8), self.bit_bytes)

    @property
    def tokens_member(self) -> int:
        """Bytes of the tokens member with its tar header and padding."""
        return TAR_BLOCK + _padded(len(self.tokens_header) + self.token_bytes)

    @property
    def tokens_at(self) -> int:
        """Offset of the first token id within a sample."""
        return TAR_BLOCK + len(self.tokens_header)

    @property
    def starts_at(self) -> int:
        return self.tokens_member + TAR_BLOCK + len(self.starts_header)

    @property
    def stride(self) -> int:
        """Bytes of one sample (its members, headers and padding): sample i starts at byte i * stride."""
        starts = TAR_BLOCK + _padded(len(self.starts_header) + self.bit_bytes) if self.doc_boundaries else 0
        return self.tokens_member + starts


    def table_at(self, samples: int) -> int:
        """Offset of the crc32 table's first entry in a shard of `samples` samples."""
        return samples * self.stride + TAR_BLOCK

    def shard_bytes(self, samples: int) -> int:
        """The whole tar: the samples, the crc32 table member, two zero blocks that end the archive."""
        return self.table_at(samples) + _padded(samples * self.blocks * 4) + 2 * TAR_BLOCK

    def block_bytes(self, block: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Byte ranges within a sample of block `block`'s token ids and its document-start bytes."""
        lo, hi = block * self.crc_block, min((block + 1) * self.crc_block, self.sample_len)
        size = self.dtype.itemsize
        tokens = (self.tokens_at + lo * size, self.tokens_at + hi * size)
        starts = (self.starts_at + lo // 8, self.starts_at + -(-hi // 8)) if self.doc_boundaries else (0, 0)
        return tokens, starts

    def crc(self, key: str, block: int, token_bytes: bytes | memoryview, start_bytes: bytes | memoryview) -> int:
        return zlib.crc32(block.to_bytes(4, "little"), zlib.crc32(start_bytes, zlib.crc32(token_bytes, zlib.crc32(key.encode()))))

    def encode(self, stem: str, samples: np.ndarray, doc_starts: np.ndarray | None) -> bytes:
        """The whole shard of samples [n, sample_len] and their document starts (bool [n, sample_len])."""
        n = len(samples)
        body = np.zeros((n, self.stride), dtype=np.uint8)
        keys = [sample_key(stem, i) for i in range(n)]
        body[:, :TAR_BLOCK] = tar_headers([f"{k}.{TOKENS_FIELD}" for k in keys], len(self.tokens_header) + self.token_bytes)
        body[:, TAR_BLOCK: self.tokens_at] = np.frombuffer(self.tokens_header, np.uint8)
        tokens = np.ascontiguousarray(samples, dtype=self.dtype.newbyteorder("<"))
        body[:, self.tokens_at: self.tokens_at + self.token_bytes] = tokens.view(np.uint8).reshape(n, self.token_bytes)
        if self.doc_boundaries:
            at = self.tokens_member
            body[:, at: at + TAR_BLOCK] = tar_headers([f"{k}.{STARTS_FIELD}" for k in keys],
                                                      len(self.starts_header) + self.bit_bytes)
            body[:, at + TAR_BLOCK: self.starts_at] = np.frombuffer(self.starts_header, np.uint8)
            body[:, self.starts_at: self.starts_at + self.bit_bytes] = np.packbits(doc_starts, axis=1)
        table = np.array([[self.crc(key, b, row[t0:t1], row[s0:s1]) for b, ((t0, t1), (s0, s1))
                           in enumerate(map(self.block_bytes, range(self.blocks)))]
                          for key, row in zip(keys, body)], dtype="<u4").reshape(n, self.blocks)
        table_bytes = table.tobytes()
        end = bytes(self.shard_bytes(n) - self.table_at(n) - len(table_bytes))
        return body.tobytes() + tar_headers([CRC_MEMBER], len(table_bytes)).tobytes() + table_bytes + end

    def decode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [k, sample_len] and document starts (bool [k, sample_len], or None) of whole samples [k, stride]."""
        tokens = np.ascontiguousarray(rows[:, self.tokens_at: self.tokens_at + self.token_bytes])
        tokens = tokens.view(self.dtype.newbyteorder("<")).astype(self.dtype, copy=False)
        if not self.doc_boundaries:
            return tokens, None
        bits = rows[:, self.starts_at: self.starts_at + self.bit_bytes]
        return tokens, np.unpackbits(bits, axis=1, count=self.sample_len).astype(bool)


def write_shard(path: Path, samples: np.ndarray, doc_starts: np.ndarray | None = None,
                crc_block: int = CRC_BLOCK) -> "ShardInfo":
    """Write samples [n, sample_len] (and, if given, where documents start: bool [n, sample_len]) as one
    shard, atomically (a temporary name, then a rename)."""
    layout = SampleLayout(samples.shape[1], samples.dtype, doc_starts is not None, crc_block)
    data = layout.encode(path.name.removesuffix(".tar"), samples, doc_starts)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return ShardInfo(name=path.name, samples=len(samples), tokens=int(samples.size), bytes=len(data))


def check_shard(path: Path, shard: "ShardInfo", layout: SampleLayout) -> None:
    """Read a whole local shard: every sample's crc32s, then every byte against the shard its samples make (tar
    headers, .npy headers, padding, the crc32 table). ShardError names what differs."""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing")
    data = path.read_bytes()
    stem = shard.name.removesuffix(".tar")
    if len(data) != layout.shard_bytes(shard.samples):
        raise ShardError(f"shard {path} has {len(data)} bytes, {MANIFEST_FILE} implies "
                         f"{layout.shard_bytes(shard.samples)} ({shard.samples} samples of {layout.stride} bytes): "
                         f"restore it or preprocess again")
    rows = np.frombuffer(data, np.uint8, count=shard.samples * layout.stride).reshape(shard.samples, layout.stride)
    table = np.frombuffer(data, "<u4", count=shard.samples * layout.blocks, offset=layout.table_at(shard.samples))
    verify_blocks(str(path), stem, layout, np.arange(shard.samples), range(layout.blocks),
                  lambda row, lo, hi: rows[row, lo:hi], table.reshape(shard.samples, layout.blocks))
    if layout.encode(stem, *layout.decode(rows)) != data:
        raise ShardError(f"shard {path}: its tar or .npy headers, padding or crc32 table differ from what its "
                         f"samples make: restore it or preprocess again")


def verify_blocks(where: str, stem: str, layout: SampleLayout, indices: np.ndarray, blocks: range, part,
                  stored: np.ndarray) -> None:
    """Check blocks `blocks` of samples `indices` of shard `stem`: part(row, lo, hi) gives bytes [lo, hi) of the
    row-th sample (offsets within a sample), `stored` [rows, len(blocks)] their crc32s from the table.
    ShardError names the shard and the first sample (and block) that fails."""
    bad = []
    for row, index in enumerate(indices.tolist()):
        key = sample_key(stem, index)
        for col, block in enumerate(blocks):
            (t0, t1), (s0, s1) = layout.block_bytes(block)
            if layout.crc(key, block, part(row, t0, t1), part(row, s0, s1) if s1 > s0 else b"") != stored[row, col]:
                bad.append((index, block))
                break
    if bad:
        index, block = bad[0]
        raise ShardError(f"shard {where}: sample {index} ({sample_key(stem, index)}) fails its crc32 (block {block}; "
                         f"{len(bad)} of the {len(indices)} samples read do): the shard changed since "
                         f"preprocessing; restore it or preprocess again")


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
    doc_boundaries: bool = False   # samples carry document starts
    crc_block: int = CRC_BLOCK     # tokens per crc32
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
    def layout(self) -> SampleLayout:
        return SampleLayout(self.sample_len, np.dtype(self.dtype), self.doc_boundaries, self.crc_block)

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
        """Read every shard whole (size, every crc32, every header and padding byte) and re-hash the tokenizer; raise
        ShardError naming the first shard (and sample) that differs."""
        for split in self.splits:
            for shard in self.shards(split):
                check_shard(self.shard_path(shard), shard, self.layout)
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
                             f"version {FORMAT_VERSION} (one WebDataset sample per sequence, at fixed offsets, a crc32 per "
                             f"{CRC_BLOCK} tokens): preprocess "
                             f"the data again (`distlm preprocess` with the same data.inputs)")
        record["tokenizer"] = TokenizerInfo(**record["tokenizer"])
        record["splits"] = {
            name: SplitInfo(samples=s["samples"], tokens=s["tokens"], shards=[ShardInfo(**x) for x in s["shards"]])
            for name, s in record["splits"].items()
        }
        return cls(**record, data_dir=data_dir if is_url(data_dir) else Path(data_dir))
