"""Fixtures and helpers shared by several test files (test modules import helpers from here, never from each
other), and the `gpu` marker's rule: without CUDA those tests are skipped, saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from distlm.config import Config, compose_config
from distlm.train.worker.metrics import last_per_step, read_metrics

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: where torch sees none they are skipped with the reason (`-ra` lists it)."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (a `gpu` test: benchmarks/gpu_suite.sh runs them)"))


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


def make_kjv_chapters(out: Path) -> list[dict]:
    """The demo corpus, written by tools/make_demo_corpus.py: one {"text", "id"} per Bible chapter."""
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_corpus.py"), str(out)], check=True,
                   capture_output=True)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def kjv_chapters(tmp_path_factory) -> list[dict]:
    return make_kjv_chapters(tmp_path_factory.mktemp("kjv") / "kjv.jsonl")


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


def decoded_documents(manifest, split: str) -> list[str]:
    """The split's documents as the shards hold them (the last one may be cut by the dropped tail)."""
    from tokenizers import Tokenizer

    from distlm.data.loading.reading import read_samples

    tokenizer = Tokenizer.from_file(str(manifest.tokenizer_path))
    stream = np.concatenate([read_samples(str(manifest.shard_path(s)), s, manifest.layout, np.arange(s.samples),
                                          verify=True)[0].ravel() for s in manifest.shards(split)])
    ends = np.flatnonzero(stream == manifest.eos_id)
    return [tokenizer.decode(doc.tolist()) for doc in np.split(stream, ends + 1)[:-1]] + ["<cut>"]


# ---------------------------------------------------------------- training (tests/test_train.py and others)

def make_bible_shards(chapters: list[dict], root: Path) -> Path:
    """The first 200 Bible chapters preprocessed into root/shards (vocab 512, 64-token samples); Ray must be up.
    Also used by tests/data/record_tiny_curve.py, so the recorded CPU curve and the GPU test read the same data."""
    from distlm.data.preprocess.pipeline import preprocess

    corpus = root / "kjv200.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in chapters[:200]), encoding="utf-8")
    preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={root / 'shards'}", "data.seq_len=64",
                              "data.tokenizer.vocab_size=512", "data.samples_per_shard=256"))
    return root / "shards"


@pytest.fixture(scope="module")
def bible_shards(ray_local, kjv_chapters, tmp_path_factory) -> Path:
    """The first 200 Bible chapters preprocessed into shards (vocab 512, 64-token samples)."""
    return make_bible_shards(kjv_chapters, tmp_path_factory.mktemp("bible"))


TRAIN_STEPS = 12  # tests/test_train.py's run; the others set trainer.max_steps themselves


def train_overrides(data_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    """A short 2-worker run of model=test on bible_shards (vocab 512, 64-token samples), later overrides win."""
    return ["model=test", "data.seq_len=64", "data.tokenizer.vocab_size=512", f"data.dir={data_dir}",
            f"run_dir={run_dir}", f"trainer.max_steps={TRAIN_STEPS}", "trainer.micro_batch_size=4",
            "optimizer.warmup_steps=2", "trainer.eval_every=6", "trainer.eval_batches=2", "trainer.checkpoint_every=4",
            "trainer.log_every=4", "logger.wandb=false", *overrides]


def train_config(data_dir: Path, run_dir: Path, *overrides: str) -> Config:
    return compose_config(*train_overrides(data_dir, run_dir, *overrides))


# ---------------------------------------------------------------- the recorded loss curve (tests/data)

TINY_CURVE = REPO / "tests" / "data" / "tiny_cpu_fp32_curve.json"


def tiny_curve_config(data_dir: Path, run_dir: Path, *overrides: str) -> Config:
    """The run whose CPU fp32 loss curve tests/data/record_tiny_curve.py records: model=tiny on bible_shards, one
    rank, 40 steps of 16 x 64 tokens; `cluster.use_gpu=true` makes it the GPU's bf16 run (tests/test_gpu.py)."""
    return compose_config("model=tiny", "data.seq_len=64", "data.tokenizer.vocab_size=512", f"data.dir={data_dir}",
                          f"run_dir={run_dir}", "cluster.num_workers=1", "trainer.max_steps=40",
                          "trainer.micro_batch_size=16", "optimizer.warmup_steps=5", "trainer.eval_every=1000",
                          "trainer.eval_batches=1", "trainer.checkpoint_every=1000", "trainer.log_every=10",
                          "logger.wandb=false", "logger.samples=0", *overrides)


def fit(rank: int, c: Config) -> None:
    """One Trainer's run (for run_ranks)."""
    from distlm.train.worker.trainer import Trainer

    Trainer(c).fit()


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    """metrics.jsonl's values of `key` by step; a step logged again (after a restart) gives its newest value."""
    return dict(last_per_step(read_metrics(run_dir), key))
