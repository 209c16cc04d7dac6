"""Reading JSONL documents and cleaning their text.

Malformed input never stops a run: each bad line is skipped and counted under a reason, so the
preprocessing summary says how much was lost and why.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from typing import Iterator

# Reasons a line is not used, as they appear in counters and the summary.
INVALID_JSON = "invalid_json"
BAD_UTF8 = "bad_utf8"
MISSING_TEXT = "missing_text"   # no such field, or not a string
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
REMOVAL_REASONS = (INVALID_JSON, BAD_UTF8, MISSING_TEXT, TOO_SHORT, TOO_LONG)

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc, less \t and \n
_HORIZONTAL_SPACE_RUN = re.compile(r"[^\S\n\t]+")   # whitespace other than newline and tab
_SPACE_BEFORE_NEWLINE = re.compile(r"[^\S\n]+\n")
_BLANK_LINE_RUN = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC-normalized text without control characters (except newline and tab), each run of spaces
    within a line collapsed to one space, no trailing spaces on lines, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n")
    text = _CONTROL_CHARS.sub("", text)
    text = _HORIZONTAL_SPACE_RUN.sub(" ", text)
    text = _SPACE_BEFORE_NEWLINE.sub("\n", text)
    text = _BLANK_LINE_RUN.sub("\n\n", text)
    return text.strip()


def parse_document(line: bytes, text_field: str, min_chars: int, max_chars: int) -> tuple[str | None, str | None]:
    """(cleaned text, None) for a usable JSONL line, else (None, the reason it is not used)."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, BAD_UTF8
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError:
        return None, INVALID_JSON
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return None, MISSING_TEXT
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate escaped in the JSON ("\ud800")
        return None, BAD_UTF8
    text = clean_text(text)
    if len(text) < min_chars:
        return None, TOO_SHORT
    if len(text) > max_chars:
        return None, TOO_LONG
    return text, None


def iter_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    """Lines of a file whose first byte lies in [start, end), so byte ranges split a file without
    cutting or repeating a line."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line that began before `start`; it belongs to the previous range
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            yield line


def read_documents(path: str, text_field: str, min_chars: int, max_chars: int,
                   start: int = 0, end: int | None = None) -> tuple[list[str], Counter]:
    """Cleaned documents of one JSONL file (or of the lines starting in byte range [start, end)), and
    counters: `lines` (non-blank lines read), `kept`, and one per removal reason."""
    end = float("inf") if end is None else end
    docs: list[str] = []
    counts: Counter = Counter()
    for line in iter_lines(path, start, end):
        if not line.strip():
            continue  # blank lines (often one at the end of a file) are not documents
        counts["lines"] += 1
        text, reason = parse_document(line, text_field, min_chars, max_chars)
        if reason:
            counts[reason] += 1
        else:
            docs.append(text)
    counts["kept"] = len(docs)
    return docs, counts
