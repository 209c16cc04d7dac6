"""Checkpoints outlive their layout: resumed at another layout (through DeepSpeed universal checkpoints)
they continue with the losses of an uninterrupted run, and every layout exports to a Hugging Face model
that computes what the trained weights compute (fp32, real gloo ranks)."""

import json
import shutil
from pathlib import Path

import deepspeed
import pytest
import torch
from transformers import AutoModelForCausalLM

from distlm.config import ConfigError, ModelConfig, compose_config, to_dict
from distlm.export.hf import export
from distlm.model.llama import Llama
from distlm.model.parallelize import full_state_dict
from distlm.train import checkpoint, universal
from distlm.train.checkpoint_cli import info
from distlm.train.launch import check_layout_change
from distlm.train.metrics import read_metrics
from distlm.train.trainer import Trainer
from distributed import run_ranks

STEPS, STOP = 5, 3
# name: (world size, overrides); every layout sees the same 8 samples per step. The test model has GQA
# (4 query heads, 2 KV heads).
LAYOUTS = {
    "single": (1, ["parallel=dp", "trainer.micro_batch_size=8"]),
    "dp2": (2, ["parallel=dp", "trainer.micro_batch_size=4"]),
    "zero3_dp2": (2, ["parallel=zero3", "trainer.micro_batch_size=4"]),
    "zero3_single": (1, ["parallel=zero3", "trainer.micro_batch_size=8"]),
    "tp2_pp2": (4, ["parallel=tp2_pp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "tp2_tied": (2, ["parallel=tp2", "trainer.micro_batch_size=8", "model.tie_embeddings=true"]),
    "pp2_tied": (2, ["parallel=pp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2",
                     "model.tie_embeddings=true"]),
}


def layout_config(data_dir: Path, run_dir: Path, layout: str, *overrides: str):
    world, layout_overrides = LAYOUTS[layout]
    # A vocabulary of 515 (the data uses 512): tensor parallelism pads it; the universal form must drop that.
    return compose_config(
        "model=test", "model.vocab_size=515", "data.seq_len=64", f"data.dir={data_dir}", f"run_dir={run_dir}",
        f"cluster.num_workers={world}", f"trainer.max_steps={STEPS}", "optimizer.warmup_steps=1",
        "trainer.eval_batches=1", "trainer.eval_every=100", "logger.wandb=false", *layout_overrides, *overrides)


def _fit(rank: int, c) -> None:
    trainer = Trainer(c)
    trainer.fit()
    with deepspeed.zero.GatheredParameters(list(trainer.engine.module.parameters())):  # no-op below ZeRO-3
        weights = full_state_dict(trainer.engine.module, trainer.layout, c.model.vocab_size)
    if rank == 0:  # the trained weights, gathered apart from the checkpoint: what an export must reproduce
        torch.save(weights, Path(c.run_dir) / f"weights_step{trainer.state.step}.pt")


def train(c) -> None:
    run_ranks(_fit, c.cluster.num_workers, c)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(bible_shards, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("straight")
    train(layout_config(bible_shards, run_dir, "single"))
    return losses(run_dir)


@pytest.fixture(scope="module")
def written(bible_shards, tmp_path_factory):
    """written(layout) -> a run dir whose checkpoint at step STOP was written by that layout (made once)."""
    runs = {}

    def make(layout: str) -> Path:
        if layout not in runs:
            runs[layout] = tmp_path_factory.mktemp(layout)
            train(layout_config(bible_shards, runs[layout], layout, f"trainer.stop_at_step={STOP}"))
        return runs[layout]
    return make


@pytest.mark.parametrize("was, now", [("dp2", "single"), ("tp2_pp2", "single"), ("single", "tp2_pp2"), ("zero3_dp2", "zero3_single")])
def test_resume_at_another_layout_continues_the_run(was, now, written, straight, bible_shards, tmp_path):
    run_dir = tmp_path / "run"
    tag_dir = run_dir / "checkpoints" / checkpoint.tag_for_step(STOP)
    shutil.copytree(written(was) / "checkpoints" / tag_dir.name, tag_dir)
    train(layout_config(bible_shards, run_dir, now))  # resume=auto
    assert (tag_dir / universal.UNIVERSAL_DIR / "zero").is_dir()  # converted on the way
    description = info(tag_dir)
    assert f"layout      {universal.describe(universal.layout_of(to_dict(layout_config(Path(), run_dir, was))))}; " \
           "universal form present" in description and "step        3" in description
    got = losses(run_dir)
    assert sorted(got) == list(range(STOP + 1, STEPS + 1))
    for step in got:  # fp32: only the order of summation differs between layouts
        assert got[step] == pytest.approx(straight[step], rel=1e-5), f"{was} -> {now}, step {step}"
    assert straight[STEPS] < straight[1]


@pytest.mark.parametrize("layout", ["tp2_pp2", "tp2_tied", "pp2_tied"])
def test_export_from_tensor_and_pipeline_layouts(layout, written, tmp_path):
    run_dir = written(layout)
    tag_dir = run_dir / "checkpoints" / checkpoint.tag_for_step(STOP)
    out = export(compose_config(f"export.checkpoint_dir={tag_dir}", f"export.out_dir={tmp_path / 'hf'}"))
    state = checkpoint.read_state(tag_dir)
    m = ModelConfig(**state.config["model"])
    reference = Llama(m).eval()
    trained = torch.load(run_dir / f"weights_step{STOP}.pt")
    if m.tie_embeddings:
        trained["lm_head.weight"] = trained["embed_tokens.weight"]
    reference.load_state_dict(trained)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.vocab_size == 515 and hf.config.tie_word_embeddings == m.tie_embeddings
    assert hf.config.num_key_value_heads == 2 < hf.config.num_attention_heads
    ids = torch.randint(0, 515, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - reference(ids)).abs().max().item() <= 1e-4


def test_layout_changes_universal_checkpoints_cannot_do_fail_before_launch(tmp_path):
    saved = checkpoint.RunState(config=to_dict(layout_config(tmp_path, tmp_path, "tp2_pp2", "parallel.zero_stage=0")))
    now = layout_config(tmp_path, tmp_path, "single", "parallel.zero_stage=0")
    with pytest.raises(ConfigError, match=r"needs a checkpoint written with parallel.zero_stage>=1\. Resume with "
                                          r"parallel.tp=2 parallel.pp=2 parallel.zero_stage=0"):
        check_layout_change(saved, now, tmp_path / "step00000003")
    zero1 = checkpoint.RunState(config=to_dict(layout_config(tmp_path, tmp_path, "dp2")))
    with pytest.raises(ConfigError, match=r"written with ZeRO-1; .* resume with parallel.zero_stage=1 \(any tp/pp/dp\)"):
        check_layout_change(zero1, layout_config(tmp_path, tmp_path, "zero3_single"), tmp_path / "step00000003")
    check_layout_change(saved, layout_config(tmp_path, tmp_path, "tp2_pp2", "parallel.zero_stage=0",
                                             "cluster.num_workers=8"), tmp_path / "step00000003")  # DP only: fine


def test_a_failed_conversion_stops_the_run_with_the_reason(written, bible_shards, tmp_path):
    run_dir = tmp_path / "run"
    tag_dir = run_dir / "checkpoints" / checkpoint.tag_for_step(STOP)
    shutil.copytree(written("single") / "checkpoints" / tag_dir.name, tag_dir)
    state = json.loads((tag_dir / checkpoint.STATE_FILE).read_text())
    for shard in tag_dir.glob("*optim_states.pt"):  # as if written with ZeRO-0: nothing to convert
        shard.unlink()
        del state["files"][shard.name]
    (tag_dir / checkpoint.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(Exception, match="cannot be converted to a universal checkpoint: ValueError: .* no ZeRO "
                                        "optimizer shards"):
        train(layout_config(bible_shards, run_dir, "dp2"))
    assert not (tag_dir / universal.UNIVERSAL_DIR).exists()
