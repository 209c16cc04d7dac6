"""Cleaning documents and the quality filters, on whole Arrow arrays of texts at once.

pyarrow's string kernels (RE2 regular expressions, Unicode normalization) do in C++ what a Python loop
over documents would do ten times slower; preprocessing throughput is bounded by the tokenizer, and
cleaning must stay small next to it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Why a cleaned document is dropped, in the order the filters apply (a document counts under the first).
EMPTY, TOO_SHORT, TOO_LONG, LOW_ALPHA, REPEATED_LINES = "empty", "too_short", "too_long", "low_alpha", "repeated_lines"
FILTER_REASONS = (EMPTY, TOO_SHORT, TOO_LONG, LOW_ALPHA, REPEATED_LINES)

_CLEANING = (  # (RE2 pattern, replacement), applied in order
    (r"\r\n?", "\n"),
    (r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", ""),            # control characters (category Cc) except \t and \n
    (r"\p{Zs}{2,}|[^\P{Zs} ]", " "),                   # runs of spaces / other space separators -> one space
    (r"[ \t]+\n", "\n"),                               # trailing spaces and tabs on a line
    (r"\n{3,}", "\n\n"),                               # at most one blank line in a row
)


def clean_texts(texts: pa.Array, unicode_form: str | None) -> pa.Array:
    """Unicode-normalized texts without control characters (except newline and tab), each run of spaces
    collapsed to one, no trailing spaces on lines, at most one blank line in a row, stripped."""
    if unicode_form:
        texts = pc.utf8_normalize(texts, unicode_form)
    for pattern, replacement in _CLEANING:
        texts = pc.replace_substring_regex(texts, pattern, replacement)
    return pc.utf8_trim_whitespace(texts)


def clean_text(text: str, unicode_form: str | None) -> str:
    """clean_texts for one string."""
    return clean_texts(pa.array([text], pa.string()), unicode_form)[0].as_py()


def filter_reasons(texts: pa.Array, min_chars: int, max_chars: int, min_alpha_fraction: float,
                   max_repeated_line_fraction: float) -> np.ndarray:
    """For each cleaned text, the index into FILTER_REASONS of the first filter that drops it, or -1."""
    chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    failed = [chars == 0, chars < min_chars, chars > max_chars,
              alpha_fraction(texts, chars) < min_alpha_fraction,
              repeated_line_fraction(texts) > max_repeated_line_fraction]
    reason = np.full(len(texts), -1, dtype=np.int8)
    for index in reversed(range(len(failed))):   # the first failing filter wins
        reason[failed[index]] = index
    return reason


def utf8_buffer(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a string array as one uint8 array, and each text's [start, end) offsets into it."""
    _, offset_buffer, data_buffer = texts.buffers()
    if offset_buffer is None:
        return np.zeros(0, np.uint8), np.zeros(len(texts) + 1, np.int64)
    offset_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(offset_buffer, dtype=offset_type)[texts.offset: texts.offset + len(texts) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return data, offsets.astype(np.int64)


_WHITESPACE = np.zeros(256, dtype=np.uint8)            # per byte: 1 for the only whitespace left after cleaning
_WHITESPACE[[9, 10, 32]] = 1
_OTHER_ASCII = np.zeros(256, dtype=np.uint8)           # per byte: 1 for ASCII that is neither a letter nor whitespace
_OTHER_ASCII[[b for b in range(128) if not chr(b).isalpha() and b not in (9, 10, 32)]] = 1


def _per_text_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """values summed over each text's [start, end) (values: one per byte of the array's data buffer)."""
    sums = np.zeros(len(offsets) - 1, dtype=np.int64)
    nonempty = offsets[1:] > offsets[:-1]       # reduceat gives an empty slice its first element, not 0
    if nonempty.any():                          # the last slice runs to the end: cut the buffer at the last text
        sums[nonempty] = np.add.reduceat(values[:offsets[-1]], offsets[:-1][nonempty], dtype=np.int64)
    return sums


def alpha_fraction(texts: pa.Array, chars: np.ndarray) -> np.ndarray:
    """Letters / non-whitespace characters (1.0 for a text of whitespace only). ASCII is classified by a
    byte table in numpy; non-ASCII characters by RE2's Unicode classes, only in texts that have any."""
    data, offsets = utf8_buffer(texts)
    spaces = _per_text_sums(_WHITESPACE[data], offsets)
    other = _per_text_sums(_OTHER_ASCII[data], offsets)
    non_ascii = ~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False)
    if non_ascii.any():
        found = pc.count_substring_regex(texts.filter(pa.array(non_ascii)), r"[^\pL\s\x00-\x7f]")
        other[non_ascii] += found.to_numpy(zero_copy_only=False)
    visible = chars - spaces
    return np.where(visible > 0, 1.0 - other / np.maximum(visible, 1), 1.0)


def repeated_line_fraction(texts: pa.Array) -> np.ndarray:
    """Share of each text's non-empty lines that repeat an earlier line of the same text."""
    lines = pc.split_pattern(texts, "\n")
    flat = pc.list_flatten(lines)
    parents = pc.list_parent_indices(lines).to_numpy(zero_copy_only=False).astype(np.int64)
    nonempty = pc.utf8_length(flat).to_numpy(zero_copy_only=False) > 0
    line_ids = pc.dictionary_encode(flat).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    parents, line_ids = parents[nonempty], line_ids[nonempty]
    total = np.bincount(parents, minlength=len(texts))
    distinct_pairs = np.unique(parents * (int(line_ids.max(initial=0)) + 1) + line_ids)
    distinct = np.bincount(distinct_pairs // (int(line_ids.max(initial=0)) + 1), minlength=len(texts))
    return np.where(total > 0, 1.0 - distinct / np.maximum(total, 1), 0.0)


def apply_filters(texts: pa.Array, d) -> tuple[pa.Array, Counter, Counter]:
    """(texts that pass every filter, documents removed per reason, UTF-8 bytes removed per reason);
    `d` is the data config."""
    reason = filter_reasons(texts, d.min_chars, d.max_chars, d.min_alpha_fraction, d.max_repeated_line_fraction)
    nbytes = pc.binary_length(texts).to_numpy(zero_copy_only=False)
    removed, removed_bytes = Counter(), Counter()
    for index, name in enumerate(FILTER_REASONS):
        hit = reason == index
        removed[name] = int(hit.sum())
        removed_bytes[name] = int(nbytes[hit].sum())
    return texts.filter(pa.array(reason < 0)), removed, removed_bytes
