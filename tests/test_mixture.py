"""Weighted mixtures (data.mix): real shards whose samples say which source and which sample they are,
the mixed stream reading them, the checks before launch, and real training runs (Ray Train, 2 gloo ranks)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from conftest import by_step

from distlm.config import ConfigError, MixSource, compose_config
from distlm.data.loading.loader import ShardLoader
from distlm.data.loading.mixture import MixSchedule
from distlm.data.preprocess.tokenizer import save_tokenizer, train_tokenizer
from distlm.data.shards import Manifest, SplitInfo, TokenizerInfo, shard_name, write_shard
from distlm.train.driver.launch import check_before_launch, train
from distlm.train.worker.metrics import read_metrics
from distlm.validation import validate_train

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LEN = 4
# name: (first sample number, shard sizes, weight); a sample's tokens are its number, so its source shows.
SOURCES = {"web": (0, [40, 25, 35], 0.6), "books": (1000, [30, 17], 0.3), "code": (2000, [9], 0.1)}
DATA = compose_config().data


def write_source(root: Path, first: int, sizes: list[int], sha256: str = "same-tokenizer",
                 sample_len: int = SAMPLE_LEN) -> Path:
    """Shards whose samples hold the tokens [n, n, ...], n = first, first + 1, ...; and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards, n = [], first
    for index, size in enumerate(sizes):
        numbers = np.arange(n, n + size, dtype=np.uint16)
        shards.append(write_shard(root / shard_name("train", index), np.repeat(numbers[:, None], sample_len, axis=1)))
        n += size
    split = SplitInfo(samples=n - first, tokens=(n - first) * sample_len, shards=shards)
    Manifest(fingerprint=f"mixture-test-{first}", seq_len=sample_len - 1, sample_len=sample_len, dtype="uint16",
             tokenizer=TokenizerInfo(file="tokenizer.json", sha256=sha256, vocab_size=3000, eos_id=0),
             splits={"train": split, "val": split}, stats={}, inputs=[], config={}).save(root)
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: write_source(root / name, first, sizes) for name, (first, sizes, _) in SOURCES.items()}


def mix_data(sources, weights=None, window=8, workers=0):
    weights = weights or {name: w for name, (_, _, w) in SOURCES.items()}
    mix = [MixSource(name=name, dir=str(sources[name]), weight=w) for name, w in weights.items()]
    return dataclasses.replace(DATA, mix=mix, shuffle_window=window, loader_workers=workers)


def mixed(sources, dp_size=1, micro=1, rank=0, steps=10, start=0, seed=3, **kw) -> list[list[int]]:
    """Rank `rank`'s batches as lists of sample numbers."""
    loader = ShardLoader(mix_data(sources, **kw), "train", micro, rank, dp_size, seed=seed, shuffle=True)
    return [batch[:, 0].tolist() for batch in loader.iter_batches(start, max_batches=steps)]


def global_steps(sources, dp_size, micro, steps, start=0, **kw) -> list[list[int]]:
    """Each step's samples over all ranks (rank 0's, then rank 1's, ...)."""
    per_rank = [mixed(sources, dp_size, micro, r, steps, start, **kw) for r in range(dp_size)]
    return [sum((per_rank[r][k] for r in range(dp_size)), []) for k in range(steps)]


def source_of(number: int) -> str:
    return {0: "web", 1: "books", 2: "code"}[number // 1000]


# ---------------------------------------------------------------- order and proportions

def test_realized_proportions_are_within_one_percent_of_the_weights_over_10k_samples(sources):
    samples = [n for batch in mixed(sources, micro=50, steps=200) for n in batch]
    assert len(samples) == 10_000
    counts = {name: sum(source_of(n) == name for n in samples) for name in SOURCES}
    for name, (_, _, weight) in SOURCES.items():
        assert abs(counts[name] / 10_000 - weight) < 0.01, counts
    # Also every 100 samples: a low-discrepancy interleave, not runs of one source.
    for lo in range(0, 10_000, 100):
        assert abs(sum(source_of(n) == "code" for n in samples[lo: lo + 100]) - 10) <= 1


def test_each_source_feeds_its_own_seeded_stream_in_order(sources):
    samples = [n for batch in mixed(sources, micro=50, steps=20) for n in batch]
    for name in SOURCES:
        alone = ShardLoader(dataclasses.replace(DATA, dir=str(sources[name]), shuffle_window=8), "train", 1, 0, 1,
                            seed=3, shuffle=True)
        fed = [n for n in samples if source_of(n) == name]
        assert fed == [b[0, 0].item() for b in alone.iter_batches(max_batches=len(fed))]
    # so a source of 9 samples repeats (its epochs reshuffled), and a whole epoch holds each sample once
    code = [n for n in samples if source_of(n) == "code"]
    assert sorted(code[:9]) == list(range(2000, 2009)) and code[9:18] != code[:9]


def test_the_schedule_counts_what_it_assigns():
    schedule = MixSchedule([0.5, 0.25, 0.125, 0.125], seed=1)
    source, index = schedule.assign(np.arange(5000))
    for n in (0, 1, 17, 999, 5000):
        assert schedule.counts(n).tolist() == np.bincount(source[:n], minlength=4).tolist()
    for s in range(4):
        assert index[source == s].tolist() == list(range(int((source == s).sum())))
    far = np.arange(10**12, 10**12 + 1000)   # position-addressable: no walk from 0
    fed = np.bincount(schedule.assign(far)[0], minlength=4)
    assert (fed == schedule.counts(far[-1] + 1) - schedule.counts(far[0])).all()


def test_the_seed_changes_the_interleave(sources):
    assert mixed(sources, micro=10, seed=3) != mixed(sources, micro=10, seed=4)


# ---------------------------------------------------------------- layouts and resume

def test_a_step_sees_the_same_samples_at_dp_1_and_dp_2(sources):
    one_rank = global_steps(sources, 1, 12, steps=12)
    assert global_steps(sources, 2, 6, steps=12) == one_rank
    assert global_steps(sources, 3, 4, steps=12, workers=2) == one_rank


def test_resume_yields_exactly_the_batches_of_an_uninterrupted_run(sources):
    straight = mixed(sources, dp_size=2, micro=4, rank=1, steps=30)
    assert mixed(sources, dp_size=2, micro=4, rank=1, steps=18, start=12 * 8) == straight[12:]


def test_resume_with_another_data_parallel_size_continues_the_same_stream(sources):
    straight = global_steps(sources, 1, 8, steps=25)
    assert global_steps(sources, 2, 4, steps=15, start=10 * 8) == straight[10:]


def test_a_single_source_mixture_is_that_source_alone(sources):
    alone = ShardLoader(dataclasses.replace(DATA, dir=str(sources["web"]), shuffle_window=8), "train", 4, 1, 2,
                        seed=3, shuffle=True)
    assert mixed(sources, dp_size=2, micro=4, rank=1, steps=30, weights={"web": 1.0}) == \
        [b[:, 0].tolist() for b in alone.iter_batches(max_batches=30)]


def test_progress_counts_each_sources_samples_and_repeats(sources):
    loader = ShardLoader(mix_data(sources), "train", 10, 0, 1, seed=3, shuffle=True)
    samples = [n for b in loader.iter_batches(max_batches=5) for n in b[:, 0].tolist()]
    progress = loader.stream.progress(50)
    assert {name: samples for name, (samples, _) in progress.items()} == \
        {name: sum(source_of(n) == name for n in samples) for name in SOURCES}
    assert progress["web"][1] == 0 and progress["code"][1] == 0   # code fed 5 of its 9
    assert loader.stream.progress(90)["code"] == (9, 0)            # exhausted, not yet repeated
    assert loader.stream.progress(100)["code"] == (10, 1)          # the 10th starts its second epoch


# ---------------------------------------------------------------- checks

def train_config(sources: dict[str, Path], run_dir: Path, *overrides: str, seq_len=SAMPLE_LEN - 1):
    mix = ",".join(f"{{name:{name},dir:'{path}',weight:0.5}}" for name, path in sources.items())
    return compose_config("model=test", f"data.seq_len={seq_len}", f"data.mix=[{mix}]", f"run_dir={run_dir}",
                          "trainer.micro_batch_size=2", "logger.wandb=false", *overrides)


def test_mix_entries_are_validated(sources, tmp_path):
    c = train_config({"web": sources["web"], "books": sources["books"]}, tmp_path)
    assert validate_train(c) == []
    c.data.mix[1].name, c.data.mix[0].weight = "web", 0.0
    c.data.mix.append(dataclasses.replace(c.data.mix[0], name="gone", dir=str(tmp_path / "nothing"), weight=1.0))
    problems = "\n".join(validate_train(c))
    assert "source names must be distinct, got ['web', 'web', 'gone']" in problems
    assert "data.mix[0] (web): weight=0.0 must be positive" in problems
    assert f"data.mix[2] (gone): no preprocessed data at '{tmp_path / 'nothing'}'" in problems


def test_a_tokenizer_mismatch_is_refused_before_launch_naming_both_sources(sources, tmp_path):
    other = write_source(tmp_path / "other", 3000, [20], sha256="another-tokenizer")
    c = train_config({"web": sources["web"], "other": other}, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.mix sources web \(.*web\) and other \(.*other\) were tokenized "
                                          r"differently .* same data.tokenizer.path"):
        train(c)
    assert not ray.is_initialized() and not (tmp_path / "run").exists()   # refused before anything started


def test_sources_of_another_seq_len_are_refused(sources, tmp_path):
    longer = write_source(tmp_path / "longer", 3000, [20], sample_len=SAMPLE_LEN + 2)
    with pytest.raises(ConfigError, match=r"web .* and longer .* hold samples of seq_len 3 and 5"):
        check_before_launch(train_config({"web": sources["web"], "longer": longer}, tmp_path / "run"))


# ---------------------------------------------------------------- real preprocessing and training

STEPS = 8
TRAIN = ["model=test", "data.seq_len=32", "data.tokenizer.vocab_size=512", f"trainer.max_steps={STEPS}",
         "trainer.micro_batch_size=4", "optimizer.warmup_steps=2", "trainer.eval_every=4", "trainer.eval_batches=2",
         "trainer.checkpoint_every=4", "trainer.log_every=4", "logger.wandb=false"]


def distlm(*args: str) -> subprocess.CompletedProcess:
    """A `distlm` command on the module's Ray cluster (RAY_ADDRESS: one cluster start for all, on a busy machine)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "distlm.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_sources(ray_local, kjv_chapters, tmp_path_factory) -> dict[str, Path]:
    """Two datasets preprocessed by `distlm preprocess` with one given tokenizer.json: the first 60 chapters
    (law) and the first 100 characters of 24 chapters of the gospels (small: it is exhausted and repeats
    within a short run)."""
    root = tmp_path_factory.mktemp("two")
    tokenizer = root / "tokenizer.json"
    save_tokenizer(train_tokenizer((d["text"] for d in kjv_chapters[:300]), 512, ["<|endoftext|>"]), tokenizer)
    dirs = {}
    gospels = [{"text": d["text"][:100]} for d in kjv_chapters[929:953]]
    for name, docs in {"law": kjv_chapters[:60], "gospels": gospels}.items():
        corpus = root / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        distlm("preprocess", f"data.inputs=[{corpus}]", f"data.dir={root / name}", f"data.tokenizer.path={tokenizer}",
               "data.seq_len=32", "data.samples_per_shard=64", "data.val_fraction=0.4", "data.near_dup_threshold=null",
               "data.keep_doc_boundaries=true")
        dirs[name] = root / name
    return dirs


def mix_override(dirs: dict[str, Path]) -> str:
    return f"data.mix=[{{name:law,dir:{dirs['law']},weight:0.6}},{{name:gospels,dir:{dirs['gospels']},weight:0.4}}]"


def test_a_two_source_mixture_trains_through_the_cli_with_document_masking(two_sources, tmp_path):
    assert Manifest.load(two_sources["law"]).tokenizer_sha256 == Manifest.load(two_sources["gospels"]).tokenizer_sha256
    gospel_samples = Manifest.load(two_sources["gospels"]).num_samples("train")
    assert gospel_samples < 0.4 * STEPS * 8   # so it repeats within the run (global batch 2 ranks x 4)
    done = distlm("train", *TRAIN, mix_override(two_sources), f"run_dir={tmp_path}", "trainer.doc_masking=true")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["doc_masking"] is True
    assert "data source gospels was exhausted; it repeats" in done.stdout + done.stderr
    records = read_metrics(tmp_path)
    last = [r for r in records if "tokens_seen/law" in r][-1]
    assert last["step"] == STEPS and last["tokens_seen/law"] + last["tokens_seen/gospels"] == last["tokens_seen"]
    assert abs(last["tokens_seen/gospels"] / last["tokens_seen"] - 0.4) < 0.02
    assert last["epoch/gospels"] >= 1 and last["epoch/law"] == 0
    val = {k: by_step(tmp_path, k) for k in ("val_loss", "val_loss/law", "val_loss/gospels")}
    assert sorted(val["val_loss/law"]) == sorted(val["val_loss/gospels"]) == [0, 4, 8]
    for step in (0, 4, 8):
        weighted = 0.6 * val["val_loss/law"][step] + 0.4 * val["val_loss/gospels"][step]
        assert val["val_loss"][step] == pytest.approx(weighted)
    assert val["val_loss/law"][8] < val["val_loss/law"][0]


def test_a_mixture_run_stopped_and_resumed_gives_the_losses_of_an_uninterrupted_one(two_sources, ray_local, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(compose_config(*TRAIN, mix_override(two_sources), f"run_dir={straight}"))
    stopped = train(compose_config(*TRAIN, mix_override(two_sources), f"run_dir={split}", "trainer.stop_at_step=3"))
    assert stopped["steps"] == 3
    reweighted = mix_override(two_sources).replace("0.6", "0.5").replace("0.4", "0.5")
    with pytest.raises(ConfigError, match=r"another sample stream: data.mix: checkpoint \[\('law', 0.6\)"):
        check_before_launch(compose_config(*TRAIN, reweighted, f"run_dir={split}"))   # would resume elsewhere
    train(compose_config(*TRAIN, mix_override(two_sources), f"run_dir={split}"))   # resume=auto: from step 3
    after = range(4, STEPS + 1)
    for key in ("loss", "tokens_seen/gospels", "epoch/gospels"):
        assert [by_step(split, key)[s] for s in after] == [by_step(straight, key)[s] for s in after], key
    assert by_step(split, "val_loss/gospels")[8] == by_step(straight, "val_loss/gospels")[8]
