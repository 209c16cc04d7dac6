"""Input files: finding them (globs, local or any fsspec URL), splitting them into read tasks, and reading
their documents.

Formats come from the file name: .jsonl/.json/.ndjson (one JSON object per line), .txt/.text (see
`data.txt_document`) and .parquet, each optionally compressed (.gz, .zst, .bz2, .xz; fsspec decompresses).
Bad input never stops a run: a line or file that cannot be used is skipped and counted under a reason.
A path that cannot be read at all is a ConfigError before any work starts.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from distlm.config import ConfigError
from distlm.data.preprocess.clean import TOO_LONG  # also a raw line or file too long to parse

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
# Uncompressed line-based files are read by several tasks, one per byte range of this size (a line belongs
# to the range holding its first byte), so one big file still spreads over the cluster.
READ_CHUNK_BYTES = 64 << 20
SNIFF_BYTES = 8192

# Why a document (or a whole file) is not used, as counted in stats.json.
INVALID_JSON, BAD_UTF8, MISSING_TEXT = "invalid_json", "bad_utf8", "missing_text"
BINARY_FILE, CORRUPT_FILE = "binary_file", "corrupt_file"
READ_REASONS = (INVALID_JSON, BAD_UTF8, MISSING_TEXT)
FILE_REASONS = (BINARY_FILE, CORRUPT_FILE)


@dataclass(frozen=True)
class InputFile:
    url: str                 # a local path, or a URL with its protocol
    fmt: str                 # jsonl | txt | parquet
    compression: str | None
    size: int
    mtime: str               # modification time or etag as the filesystem reports it (for the fingerprint)


@dataclass(frozen=True)
class ReadTask:
    file: InputFile
    start: int               # byte range [start, end) of the file; lines starting in it belong to this task
    end: int | None          # None = to the end

    def size_hint(self) -> int:
        """Input bytes this task covers."""
        return min(self.end or self.file.size, self.file.size) - self.start


@dataclass
class DocumentsRead:
    """What one read task found: the usable texts, and what it skipped, in documents and bytes per reason."""
    texts: list[str] = field(default_factory=list)
    units: int = 0                      # documents (lines, rows, files, paragraphs) seen
    removed: Counter = field(default_factory=Counter)
    removed_bytes: Counter = field(default_factory=Counter)
    bad_files: list[tuple[str, str]] = field(default_factory=list)   # (reason, url) of files skipped whole

    def skip(self, reason: str, nbytes: int, count: int = 1) -> None:
        self.removed[reason] += count
        self.removed_bytes[reason] += nbytes

    def skip_file(self, reason: str, f: InputFile) -> None:
        self.skip(reason, f.size)
        self.bad_files.append((reason, f.url))


# ---------------------------------------------------------------- finding inputs (on the driver)

def input_format(url: str) -> tuple[str, str | None]:
    """(format, compression) from a file name; ConfigError for a name that says neither."""
    name = url.rsplit("/", 1)[-1].lower()
    stem, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        stem, ext = os.path.splitext(stem)
    if ext not in FORMATS:
        raise ConfigError(f"data.inputs: cannot tell the format of '{url}' from its name; known: "
                          f"{', '.join(FORMATS)} (optionally + {', '.join(COMPRESSIONS)})")
    return FORMATS[ext], compression


def list_inputs(patterns: list[str]) -> list[InputFile]:
    """Every file the patterns match, in pattern order then name order, each checked to be readable."""
    files: list[InputFile] = []
    for pattern in patterns:
        try:
            fs, path = fsspec.core.url_to_fs(pattern)
            paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        except (ImportError, ValueError, OSError) as e:
            raise ConfigError(f"data.inputs: cannot open '{pattern}': {e}") from None
        if not paths:
            raise ConfigError(f"data.inputs: no file matches '{pattern}'")
        for p in paths:
            files.append(_checked_file(fs, p))
    unique = list({f.url: f for f in files}.values())
    return unique


def _checked_file(fs, path: str) -> InputFile:
    local = "file" in fs.protocol or "local" in fs.protocol
    url = path if local else fs.unstrip_protocol(path)
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"data.inputs: cannot read '{url}': {e}") from None
    if info.get("type") != "file":
        raise ConfigError(f"data.inputs: '{url}' is a {info.get('type')}, not a file; use a glob such as '{url}/*.jsonl'")
    if local and not os.access(path, os.R_OK):
        raise ConfigError(f"data.inputs: '{url}' is not readable (permissions)")
    fmt, compression = input_format(url)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
    return InputFile(url=url, fmt=fmt, compression=compression, size=int(info.get("size") or 0), mtime=str(mtime))


def read_tasks(files: list[InputFile], txt_document: str) -> list[ReadTask]:
    """One task per file, or per byte range of an uncompressed line-based file."""
    tasks = []
    for f in files:
        splittable = f.compression is None and (f.fmt == "jsonl" or (f.fmt == "txt" and txt_document == "line"))
        if splittable and f.size > READ_CHUNK_BYTES:
            tasks += [ReadTask(f, lo, lo + READ_CHUNK_BYTES) for lo in range(0, f.size, READ_CHUNK_BYTES)]
        else:
            tasks.append(ReadTask(f, 0, None))
    return tasks


# ---------------------------------------------------------------- reading (in Ray tasks)

def read_documents(task: ReadTask, text_field: str, txt_document: str, max_unit_bytes: int) -> DocumentsRead:
    """The raw texts of one read task; nothing here raises for bad content: it is counted instead."""
    out = DocumentsRead()
    f = task.file
    try:
        with fsspec.open(f.url, "rb", compression=f.compression) as stream:
            if f.fmt == "parquet":
                _read_parquet(stream, text_field, out)
                return out
            if b"\x00" in stream.read(SNIFF_BYTES):  # text never holds NUL bytes: a binary file would give garbage
                if task.start == 0:
                    out.skip_file(BINARY_FILE, f)
                return out
        with fsspec.open(f.url, "rb", compression=f.compression) as stream:  # decompressors cannot seek back
            if f.compression:
                stream = io.BufferedReader(stream, 1 << 20)  # some decompressors (zstd) have no readline
            if f.fmt == "jsonl":
                _read_jsonl(stream, task, text_field, max_unit_bytes, out)
            else:
                _read_txt(stream, task, txt_document, max_unit_bytes, out)
    except (ConnectionError, TimeoutError, FileNotFoundError, PermissionError):
        raise  # storage trouble, not bad content: Ray retries the task, then the run fails naming the file
    except Exception:  # noqa: BLE001 - decoders (gzip, zstd, parquet, ...) each raise their own types
        out.skip_file(CORRUPT_FILE, f)  # a truncated archive, a broken parquet file: keep what was read before
    return out


def iter_lines(stream: IO[bytes], start: int, end: int | None, max_bytes: int) -> Iterator[bytes | int]:
    """Lines whose first byte lies in [start, end), so byte ranges split a file without cutting or repeating a
    line. A line longer than max_bytes is never held in memory: its length (an int) is yielded instead."""
    if start > 0:
        stream.seek(start - 1)
        _skip_line(stream, max_bytes)  # the line that began before `start` belongs to the previous range
    while end is None or stream.tell() < end:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            yield len(line) + _skip_line(stream, max_bytes)
        else:
            yield line


def _skip_rest(stream: IO[bytes], chunk: int) -> int:
    skipped = 0
    while part := stream.read(chunk):
        skipped += len(part)
    return skipped


def _skip_line(stream: IO[bytes], chunk: int) -> int:
    skipped = 0
    while True:
        part = stream.readline(chunk)
        skipped += len(part)
        if not part or part.endswith(b"\n"):
            return skipped


def _read_jsonl(stream, task: ReadTask, text_field: str, max_bytes: int, out: DocumentsRead) -> None:
    for line in iter_lines(stream, task.start, task.end, max_bytes):
        if isinstance(line, int):
            out.units += 1
            out.skip(TOO_LONG, line)
            continue
        if not line.strip():
            continue  # blank lines (often one at the end of a file) are not documents
        out.units += 1
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            out.skip(BAD_UTF8, len(line))
            continue
        except ValueError:
            out.skip(INVALID_JSON, len(line))
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            out.skip(MISSING_TEXT, len(line))
        elif not text.isascii() and not _encodable(text):  # a lone surrogate escaped in the JSON ("\ud800")
            out.skip(BAD_UTF8, len(line))
        else:
            out.texts.append(text)


def _read_txt(stream, task: ReadTask, txt_document: str, max_bytes: int, out: DocumentsRead) -> None:
    if txt_document == "file":
        data = stream.read(max_bytes + 1)
        units = [data] if len(data) <= max_bytes else [len(data) + _skip_rest(stream, max_bytes)]
    elif txt_document == "line":
        units = iter_lines(stream, task.start, task.end, max_bytes)
    else:
        units = _paragraphs(stream, max_bytes)
    for unit in units:
        if isinstance(unit, int):
            out.units += 1
            out.skip(TOO_LONG, unit)
            continue
        if not unit.strip():
            continue
        out.units += 1
        try:
            out.texts.append(unit.decode("utf-8"))
        except UnicodeDecodeError:
            out.skip(BAD_UTF8, len(unit))


def _paragraphs(stream, max_bytes: int) -> Iterator[bytes | int]:
    """Blank-line separated blocks of a text file (a paragraph over max_bytes: its length)."""
    parts: list[bytes] = []
    size = 0
    for line in iter_lines(stream, 0, None, max_bytes):
        if isinstance(line, int) or not line.strip():
            if parts:
                yield b"".join(parts) if size <= max_bytes else size
            parts, size = [], 0
            if isinstance(line, int):
                yield line
            continue
        size += len(line)
        if size <= max_bytes:
            parts.append(line)
    if parts:
        yield b"".join(parts) if size <= max_bytes else size


def _read_parquet(stream, text_field: str, out: DocumentsRead) -> None:
    parquet = pq.ParquetFile(stream)
    rows = parquet.metadata.num_rows
    if text_field not in parquet.schema_arrow.names:
        out.units += rows
        out.skip(MISSING_TEXT, 0, count=rows)
        return
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        column = batch.column(0)
        out.units += len(column)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            out.skip(MISSING_TEXT, column.nbytes, count=len(column))
            continue
        out.skip(MISSING_TEXT, 0, count=column.null_count)
        out.texts += [t for t in column.to_pylist() if t is not None]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
