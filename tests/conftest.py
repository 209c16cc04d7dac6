"""Fixtures shared by several test files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from distlm.config import Config, compose_config

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data pipeline (tests/test_preprocess.py, ...)

@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster of 2 CPUs for one test module, shut down after it (other modules check
    that their commands start no Ray before failing)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def kjv_chapters(tmp_path_factory) -> list[dict]:
    """The demo corpus, written by tools/make_demo_corpus.py: one {"text", "id"} per Bible chapter."""
    out = tmp_path_factory.mktemp("kjv") / "kjv.jsonl"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_corpus.py"), str(out)], check=True,
                   capture_output=True)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def data_config():
    """data_config(inputs, out_dir, *overrides) -> Config from the real conf/, small and fast by default."""
    def make(inputs: list[Path], out_dir: Path, *overrides: str) -> Config:
        return compose_config(
            "data.inputs=[" + ",".join(str(p) for p in inputs) + "]",
            f"data.dir={out_dir}",
            "data.tokenizer.vocab_size=300",
            "data.seq_len=32",
            "data.samples_per_shard=64",
            "data.tokenize_task_mb=0.05",
            "data.val_fraction=0.1",
            *overrides,
        )
    return make


# ---------------------------------------------------------------- training (tests/test_train.py)

@pytest.fixture(scope="module")
def bible_shards(ray_local, kjv_chapters, tmp_path_factory) -> Path:
    """The first 200 Bible chapters preprocessed into shards (vocab 512, 64-token samples)."""
    from distlm.data.preprocess.pipeline import preprocess

    root = tmp_path_factory.mktemp("bible")
    corpus = root / "kjv200.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in kjv_chapters[:200]), encoding="utf-8")
    preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={root / 'shards'}", "data.seq_len=64",
                              "data.tokenizer.vocab_size=512", "data.samples_per_shard=256"))
    return root / "shards"
