"""Every parallel layout computes what one process computes: the same losses step by step and the same
updated weights, from the same initial weights and the same global batches (fp32, real gloo ranks); also
with document masking."""

import json
from pathlib import Path

import deepspeed
import pytest
import torch
from distributed import run_ranks

from distlm.config import compose_config
from distlm.data.preprocess.pipeline import preprocess
from distlm.model.parallelize import full_state_dict
from distlm.train.worker.metrics import read_metrics
from distlm.train.worker.trainer import Trainer

STEPS = 4
GLOBAL_BATCH = 8
# name: (world size, overrides); every layout sees the same 8 samples per step.
LAYOUTS = {
    "dp2_zero1": (2, ["parallel=dp", "trainer.micro_batch_size=4"]),
    "dp2_zero3": (2, ["parallel=zero3", "trainer.micro_batch_size=4"]),
    "tp2": (2, ["parallel=tp2", "trainer.micro_batch_size=8"]),
    "pp2": (2, ["parallel=pp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "tp2_pp2": (4, ["parallel=tp2_pp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "tp2_pp2_dp2": (8, ["parallel=3d", "trainer.micro_batch_size=2", "trainer.grad_accum=2"]),
    # Context parallelism: each rank holds a slice of every sequence. model=test has 4 query and 2 key/value
    # heads, so cp4 (and cp2 x tp2: 1 KV head per TP rank) replicate KV heads.
    "cp2": (2, ["parallel.cp=2", "trainer.micro_batch_size=8"]),
    "cp4": (4, ["parallel.cp=4", "trainer.micro_batch_size=8"]),
    "cp2_tp2": (4, ["parallel=tp2", "parallel.cp=2", "trainer.micro_batch_size=8"]),
    "cp2_pp2": (4, ["parallel=pp2", "parallel.cp=2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "cp2_dp2_zero3": (4, ["parallel=zero3", "parallel.cp=2", "trainer.micro_batch_size=4"]),
}
# Mixture of experts (model=test-moe: 4 experts): tp2 holds 2 experts per rank (expert parallelism). Micro-batches
# of 4 everywhere: the load-balancing loss is a micro-batch's (as in Megatron and Hugging Face).
MOE_LAYOUTS = {
    "ep2": (2, ["parallel=tp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "ep2_zero2": (2, ["parallel=tp2", "parallel.zero_stage=2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "ep2_pp2": LAYOUTS["tp2_pp2"],
    "dp2_zero3": LAYOUTS["dp2_zero3"],
}


def layout_config(data_dir: Path, run_dir: Path, world: int, *overrides: str, model: str = "test"):
    # A vocabulary of 515 (the data uses 512) is odd: tensor parallelism pads it, and the padding must not count.
    # Adam's eps 1e-5, not 1e-8: an element whose gradient is ~1e-8 moves by ~lr either way with 1e-8, so the
    # summation order of another layout would decide its direction (a change of d in it moves the weight by
    # ~lr d / eps); with 1e-5 the comparison measures layouts.
    return compose_config(
        f"model={model}", "model.vocab_size=515", "data.seq_len=64", f"data.dir={data_dir}", f"run_dir={run_dir}",
        f"cluster.num_workers={world}", f"trainer.max_steps={STEPS}", "optimizer.warmup_steps=1", "optimizer.eps=1e-5",
        "trainer.eval_batches=1", "trainer.eval_every=100", "logger.wandb=false", *overrides)


def _train(rank: int, c) -> None:
    trainer = Trainer(c)
    trainer.fit()
    with deepspeed.zero.GatheredParameters(list(trainer.engine.module.parameters())):  # no-op below ZeRO-3
        weights = full_state_dict(trainer.engine.module, trainer.layout, c.model.vocab_size)
    if rank == 0:
        torch.save(weights, Path(c.run_dir) / "weights.pt")


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def single_process(bible_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    run_ranks(_train, 1, layout_config(bible_shards, run_dir, 1, f"trainer.micro_batch_size={GLOBAL_BATCH}"))
    return run_dir


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, single_process, bible_shards, tmp_path):
    assert_layout_matches(name, single_process, bible_shards, tmp_path)


@pytest.fixture(scope="module")
def verse_shards(ray_local, kjv_chapters, tmp_path_factory) -> Path:
    """Bible verses (short documents: several in every 64-token sample) preprocessed with their boundaries."""
    root = tmp_path_factory.mktemp("verses")
    corpus = root / "verses.jsonl"
    corpus.write_text("".join(json.dumps({"text": v}) + "\n" for c in kjv_chapters[:40] for v in c["text"].split("\n")))
    preprocess(compose_config(f"data.inputs=[{corpus}]", f"data.dir={root / 'shards'}", "data.seq_len=64",
                              "data.tokenizer.vocab_size=512", "data.samples_per_shard=64",
                              "data.keep_doc_boundaries=true"))
    return root / "shards"


@pytest.fixture(scope="module")
def single_process_masked(verse_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single_masked")
    run_ranks(_train, 1, layout_config(verse_shards, run_dir, 1, f"trainer.micro_batch_size={GLOBAL_BATCH}",
                                       "trainer.doc_masking=true"))
    return run_dir


def test_document_masking_changes_what_one_process_computes(single_process_masked, verse_shards, tmp_path):
    run_ranks(_train, 1, layout_config(verse_shards, tmp_path, 1, f"trainer.micro_batch_size={GLOBAL_BATCH}"))
    masked, unmasked = losses(single_process_masked), losses(tmp_path)
    assert abs(masked[0] - unmasked[0]) > 1e-4 and masked != pytest.approx(unmasked, rel=1e-5)


@pytest.mark.parametrize("name", ["tp2", "pp2", "tp2_pp2", "cp2", "cp4", "cp2_tp2", "cp2_pp2"])
def test_masked_layout_matches_single_process(name, single_process_masked, verse_shards, tmp_path):
    assert_layout_matches(name, single_process_masked, verse_shards, tmp_path, "trainer.doc_masking=true")


def assert_layout_matches(name: str, single_process: Path, data_dir: Path, tmp_path: Path, *extra: str,
                          model: str = "test", layouts: dict = LAYOUTS) -> None:
    world, overrides = layouts[name]
    c = layout_config(data_dir, tmp_path, world, *overrides, *extra, model=model)
    assert c.global_batch_size == GLOBAL_BATCH
    run_ranks(_train, world, c)
    expected, got = losses(single_process), losses(tmp_path)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=1e-5), f"{name}: {got} vs {expected}"
    assert expected[-1] < expected[0]  # it trained: the comparison is not between untouched models
    reference = torch.load(single_process / "weights.pt")
    weights = torch.load(tmp_path / "weights.pt")
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=2e-6, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def single_process_moe(bible_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single_moe")
    run_ranks(_train, 1, layout_config(bible_shards, run_dir, 1, "trainer.micro_batch_size=4", "trainer.grad_accum=2",
                                       model="test-moe"))
    return run_dir


@pytest.mark.parametrize("name", MOE_LAYOUTS)
def test_moe_layout_matches_single_process(name, single_process_moe, bible_shards, tmp_path):
    # Expert parallelism with ZeRO-1 and -2 and pipeline stages, and experts partitioned by ZeRO-3.
    assert_layout_matches(name, single_process_moe, bible_shards, tmp_path, model="test-moe", layouts=MOE_LAYOUTS)
    records = [r for r in read_metrics(tmp_path) if "moe_aux_loss" in r]
    assert len(records) == STEPS and all(r["moe_load_max_over_mean"] >= 1.0 for r in records)


def test_zero3_trains_in_bf16_as_zero1_does(single_process, bible_shards, tmp_path):
    # ZeRO-3 builds bf16 partitions itself (DeepSpeed casts other modules): the same bf16 training as ZeRO-1.
    runs = {}
    for name, layout in (("zero1", "parallel=dp"), ("zero3", "parallel=zero3")):
        run_ranks(_train, 2, layout_config(bible_shards, tmp_path / name, 2, layout, "trainer.micro_batch_size=4",
                                           "trainer.precision=bf16"))
        runs[name] = losses(tmp_path / name)
    assert runs["zero3"] == runs["zero1"]             # the same numbers (measured: bit for bit)
    assert runs["zero3"] != losses(single_process)   # and not fp32's: the step really ran in bf16
