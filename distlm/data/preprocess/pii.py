"""Personal data out of the corpus: e-mail addresses, IP addresses and phone numbers (and the user's own
patterns, data.pii.patterns) replaced by placeholders, counted per kind and document.

Python's `re`, not pyarrow's RE2 as in clean.py: telling an address from a version number, a date, a time
or a slice in code needs lookarounds and a look at the words before a match, which RE2 lacks. Python's
engine is slow (≈0.3 MB/s for all kinds together), so RE2 does the bulk of the work: one vectorized pass
over the batch finds the documents, then the lines, that could hold a built-in kind (a small share of real
text), and only those lines go through the precise pass (one compiled pattern, every kind an alternative of
it). A pattern of one's own sends every line through Python.

What is and is not replaced (tests/test_pii.py holds the cases):
- email  local@domain.tld, the top-level domain two letters or more.
- ipv4   four dotted numbers 0-255, not part of a longer dotted or numeric run; a dotted quad right after a
         version word (version, ver, v, release, build, firmware, section, chapter) is a version, not an address.
- ipv6   eight colon-separated hex groups, or a `::` form with three groups or more or a leading 4-digit group
         (2001:db8::1, fe80::1); not `::1`, `a[1::2]`, `Foo::Bar`, times (12:30:45) or MAC addresses.
- phone  a `+` country code and 8-15 digits in groups ("+44 20 7946 0958", "+1 (555) 123-4567");
         North American 10 digits in 3-3-4 groups ("(555) 123-4567", "555.123.4567", "1-800-555-0199");
         a national number starting with 0, 10-11 digits in groups with one kind of separator
         ("020 7946 0958", "06 12 34 56 78"). Not: bare digit runs, local 7-digit numbers, dates, ranges,
         decimals, thousands separators.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUILTIN_KINDS = ("email", "ipv4", "ipv6", "phone")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX = r"[0-9A-Fa-f]{1,4}"
_PATTERNS = {
    "email": r"(?<![\w.%+-])[\w%+-][\w.%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
             r"(?![\w-])",
    "ipv6": rf"(?<![\w:.])(?:{_HEX}(?::{_HEX}){{0,5}})?::(?:{_HEX}:){{0,4}}"   # IPv4 in IPv6: ::ffff:1.2.3.4
            rf"{_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)"
            rf"|(?<![\w:.]){_HEX}(?::{_HEX}){{7}}(?![\w:])"
            rf"|(?<![\w:.])(?:{_HEX}(?::{_HEX}){{0,6}})?::(?:{_HEX}(?::{_HEX}){{0,6}})?(?![\w:])",
    "ipv4": rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)",
    "phone": r"(?<![\w+.-])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){2,6}(?![\w]|[.-]\d)"
             r"|(?<![\w+./-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w]|[./:-]\d)"
             r"|(?<![\w+./:-])0\d{1,4}(?:[ .-]\d{2,4}){2,4}(?![\w]|[./:-]\d)",
}
# Documents that may hold a built-in kind (RE2, a superset of the patterns above): the rest skip the precise pass.
_CANDIDATE = "|".join([
    r"[\w.%+-]@[A-Za-z0-9]",                              # email
    r"\d\.\d{1,3}\.\d{1,3}\.\d",                          # ipv4
    r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:|::[0-9A-Fa-f]",        # ipv6
    r"\+\d|\d[ .-]\d{3}[ .-]\d{4}|\) ?\d{3}[ .-]\d{4}|0\d{0,3}[ .-]\d{2,4}[ .-]\d\d",  # phone
])
_VERSION_WORD = re.compile(r"\b(?:version|ver|v|release|build|firmware|section|chapter)\.?:?\s*$", re.IGNORECASE)


class Redactor:
    """Replaces every kind in `kinds` (built-in kinds, then the user's) by its placeholder."""

    def __init__(self, kinds: list[str], placeholders: dict, user_patterns: dict):
        self.kinds = [*kinds, *(k for k in user_patterns if k not in kinds)]
        self.placeholders, self.user_patterns = dict(placeholders), dict(user_patterns)
        self.column = {k: i for i, k in enumerate(self.kinds)}
        # The user's patterns first: where theirs and a built-in one match at the same place, theirs wins.
        alternatives = [f"(?P<{k}>{p})" for k, p in self.user_patterns.items()]
        alternatives += [f"(?P<{k}>{_PATTERNS[k]})" for k in kinds]
        self.pattern = re.compile("|".join(alternatives))

    @classmethod
    def from_config(cls, pii) -> "Redactor | None":
        """data.pii as a Redactor, or None when redaction is off."""
        return cls(list(pii.kinds), pii.placeholders, pii.patterns) if pii.enabled else None

    def redact(self, texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """(texts with every match replaced, matches replaced per document and kind [documents, len(kinds)]).
        Matches never span lines: only the lines that may hold a match go through Python."""
        counts = np.zeros((len(texts), len(self.kinds)), dtype=np.int32)
        rows = self._maybe(texts)
        if not len(rows):
            return texts, counts
        lines = pc.split_pattern(texts.take(pa.array(rows)), "\n")
        flat = pc.list_flatten(lines)
        doc_of = rows[pc.list_parent_indices(lines).to_numpy(zero_copy_only=False)]
        line_texts = flat.to_pylist()
        for i in self._maybe(flat):
            found = counts[doc_of[i]]
            line_texts[i] = self.pattern.sub(lambda m: self._replace(m, found), line_texts[i])
        offsets = lines.offsets.to_numpy(zero_copy_only=False)
        out = texts.to_pylist()
        for j, row in enumerate(rows):
            out[row] = "\n".join(line_texts[offsets[j]: offsets[j + 1]])
        return pa.array(out, pa.string()), counts

    def _maybe(self, texts: pa.Array) -> np.ndarray:
        """Indices of the texts that may hold a match: RE2's quick look for the built-in kinds; all of them
        when there are patterns of one's own (Python syntax, which RE2 may not read the same way)."""
        if self.user_patterns:
            return np.arange(len(texts))
        if not self.kinds or not len(texts):
            return np.zeros(0, dtype=np.int64)
        maybe = pc.match_substring_regex(texts, _CANDIDATE).fill_null(False)
        return np.flatnonzero(maybe.to_numpy(zero_copy_only=False))

    def _replace(self, m: re.Match, found: np.ndarray) -> str:
        kind = m.lastgroup
        if kind not in self.user_patterns and not _plausible(kind, m):
            return m.group(0)
        found[self.column[kind]] += 1
        return self.placeholders[kind]

    def redact_text(self, text: str) -> str:
        return self.redact(pa.array([text], pa.string()))[0][0].as_py()


def _plausible(kind: str, m: re.Match) -> bool:
    """The checks a regular expression says badly: context words, group counts, digit counts."""
    text = m.group(0)
    if kind == "ipv4":
        return not _VERSION_WORD.search(m.string, max(0, m.start() - 12), m.start())
    if kind == "ipv6":
        if "::" not in text:
            return True
        groups = [g for g in re.split(":+", text) if g]
        return len(groups) >= 3 or (len(groups) == 2 and len(groups[0]) == 4)
    if kind == "phone":
        digits = sum(c.isdigit() for c in text)
        if text.startswith("+"):
            return 8 <= digits <= 15
        if text.startswith("0"):
            return 10 <= digits <= 11 and len(set(re.findall(r"[ .-]", text))) == 1
        return True
    return True


def config_problems(pii) -> list[str]:
    """What is wrong with data.pii, each naming the key."""
    problems = []
    unknown = [k for k in pii.kinds if k not in BUILTIN_KINDS]
    if unknown:
        problems.append(f"data.pii.kinds: unknown {unknown}; the built-in kinds are {list(BUILTIN_KINDS)} "
                        f"(add your own under data.pii.patterns)")
    for name, pattern in pii.patterns.items():
        if name in BUILTIN_KINDS or not name.isidentifier():
            problems.append(f"data.pii.patterns.{name}: a pattern name must be an identifier other than the "
                            f"built-in kinds {list(BUILTIN_KINDS)}")
            continue
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            problems.append(f"data.pii.patterns.{name}: not a Python regular expression ({e})")
            continue
        if compiled.groupindex:
            problems.append(f"data.pii.patterns.{name}: named groups (?P<...>) are not allowed; use (?:...)")
        if compiled.match(""):
            problems.append(f"data.pii.patterns.{name}: matches the empty string (every position would be replaced)")
    for kind in [*pii.kinds, *pii.patterns]:
        if not isinstance(pii.placeholders.get(kind), str):
            problems.append(f"data.pii.placeholders.{kind}: missing; give the text that replaces a {kind}")
    return problems
