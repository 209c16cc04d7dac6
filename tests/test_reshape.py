"""Checkpoints outlive their layout: resumed at another layout (through DeepSpeed universal checkpoints)
they continue with the losses of an uninterrupted run, and every layout exports to a Hugging Face model
that computes what the trained weights compute (fp32, real gloo ranks)."""

import json
import os
import shutil
from pathlib import Path

import deepspeed
import pytest
import torch
from distributed import run_ranks
from transformers import AutoModelForCausalLM

from distlm.checkpoint import store, universal
from distlm.checkpoint.cli import info, reshape
from distlm.config import CheckpointError, ConfigError, ModelConfig, compose_config, to_dict
from distlm.data.shards import Manifest
from distlm.hf.export import export
from distlm.hf.importer import import_hf
from distlm.model.llama import Llama
from distlm.model.parallelize import full_state_dict
from distlm.train import resume
from distlm.train.driver import launch
from distlm.train.resume import ResumeKind, check_layout_change
from distlm.train.worker.metrics import read_metrics
from distlm.train.worker.trainer import Trainer

STEPS, STOP = 5, 3
# name: (world size, overrides); every layout sees the same 8 samples per step. The test model has GQA
# (4 query heads, 2 KV heads).
LAYOUTS = {
    "single": (1, ["parallel=dp", "trainer.micro_batch_size=8"]),
    "dp2": (2, ["parallel=dp", "trainer.micro_batch_size=4"]),
    "zero3_dp2": (2, ["parallel=zero3", "trainer.micro_batch_size=4"]),
    "zero3_single": (1, ["parallel=zero3", "trainer.micro_batch_size=8"]),
    "zero3_dp2_one_sub_group": (2, ["parallel=zero3", "trainer.micro_batch_size=4",
                                    "parallel.zero3_sub_group_blocks=1000"]),
    "zero3_single_one_sub_group": (1, ["parallel=zero3", "trainer.micro_batch_size=8",
                                       "parallel.zero3_sub_group_blocks=1000"]),
    "tp2_pp2": (4, ["parallel=tp2_pp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "tp2_tied": (2, ["parallel=tp2", "trainer.micro_batch_size=8", "model.tie_embeddings=true"]),
    "pp2_tied": (2, ["parallel=pp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2",
                     "model.tie_embeddings=true"]),
    "cp2": (2, ["parallel.cp=2", "trainer.micro_batch_size=8"]),
    # Mixture of experts (4 experts; micro-batches of 4 everywhere: the balancing loss is a micro-batch's)
    "moe_single": (1, ["model=test-moe", "parallel=dp", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
    "moe_ep2": (2, ["model=test-moe", "parallel=tp2", "trainer.micro_batch_size=4", "trainer.grad_accum=2"]),
}


def layout_config(data_dir: Path, run_dir: Path, layout: str, *overrides: str):
    world, layout_overrides = LAYOUTS[layout]
    model = [o for o in layout_overrides if o.startswith("model=")] or ["model=test"]
    # A vocabulary of 515 (the data uses 512): tensor parallelism pads it; the universal form must drop that.
    return compose_config(
        *model, "model.vocab_size=515", "data.seq_len=64", f"data.dir={data_dir}", f"run_dir={run_dir}",
        f"cluster.num_workers={world}", f"trainer.max_steps={STEPS}", "optimizer.warmup_steps=1",
        "trainer.eval_batches=1", "trainer.eval_every=100", "logger.wandb=false",
        *(o for o in layout_overrides if o not in model), *overrides)


def _fit(rank: int, c, plan) -> None:
    trainer = Trainer(c, plan)
    trainer.fit()
    with deepspeed.zero.GatheredParameters(list(trainer.engine.module.parameters())):  # no-op below ZeRO-3
        weights = full_state_dict(trainer.engine.module, trainer.layout, c.model.vocab_size)
    if rank == 0:  # the trained weights, gathered apart from the checkpoint: what an export must reproduce
        torch.save(weights, Path(c.run_dir) / f"weights_step{trainer.state.step}.pt")


def plan(c) -> resume.ResumePlan:
    return resume.plan_resume(c, Manifest.load(c.data.dir).tokenizer_sha256)


def train(c) -> None:
    """As `distlm train`: the plan made and prepared (a universal conversion on Ray tasks) before any rank starts."""
    made = plan(c)
    resume.prepare(made)
    run_ranks(_fit, c.cluster.num_workers, c, made)


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


# zero3_dp2 -> zero3_single at conf's defaults fails (step 5 differs by 4.5e-4): with ZeRO-3 optimizer sub-groups
# smaller than a rank's partition (parallel.zero3_sub_group_blocks=1, the training-memory default), the optimizer
# states loaded through the universal form at another dp are not the ones saved. With one sub-group per partition
# it continues exactly (the _one_sub_group pair). strict: the day it is fixed, this marker must go.
ZERO3_RESUME = pytest.param("zero3_dp2", "zero3_single", marks=pytest.mark.xfail(
    reason="ZeRO-3 sub-groups smaller than the partition break a universal resume at another dp; open", strict=True))


@pytest.mark.parametrize("was, now", [("dp2", "single"), ("tp2_pp2", "single"), ("single", "tp2_pp2"), ZERO3_RESUME,
                                     ("zero3_dp2_one_sub_group", "zero3_single_one_sub_group"), ("cp2", "single"), ("single", "cp2")])
def test_resume_at_another_layout_continues_the_run(was, now, written, straight, bible_shards, tmp_path):
    run_dir = tmp_path / "run"
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STOP)
    shutil.copytree(written(was) / "checkpoints" / tag_dir.name, tag_dir)
    train(layout_config(bible_shards, run_dir, now))  # resume=auto
    assert universal.is_complete(tag_dir)  # converted on the way, before the ranks started
    description = info(tag_dir)
    assert f"layout      {universal.describe(universal.layout_of(to_dict(layout_config(Path(), run_dir, was))))}; " \
           "universal form present" in description and "step        3" in description
    got = losses(run_dir)
    assert sorted(got) == list(range(STOP + 1, STEPS + 1))
    for step in got:  # fp32: only the order of summation differs between layouts
        assert got[step] == pytest.approx(straight[step], rel=1e-5), f"{was} -> {now}, step {step}"
    assert straight[STEPS] < straight[1]


def test_a_mixture_of_experts_resumes_at_another_ep_and_exports_to_mixtral(written, bible_shards, tmp_path):
    straight_run = tmp_path / "straight"
    train(layout_config(bible_shards, straight_run, "moe_single"))
    straight_moe = losses(straight_run)
    run_dir = tmp_path / "run"
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STOP)
    shutil.copytree(written("moe_ep2") / "checkpoints" / tag_dir.name, tag_dir)
    train(layout_config(bible_shards, run_dir, "moe_single"))  # ep2 -> one process, through the universal form
    got = losses(run_dir)
    assert sorted(got) == list(range(STOP + 1, STEPS + 1)) and straight_moe[STEPS] < straight_moe[1]
    for step in got:
        assert got[step] == pytest.approx(straight_moe[step], rel=1e-5), f"ep2 -> ep1, step {step}"

    # The ep2 checkpoint exports to Mixtral (verified by the export itself); transformers computes the trained
    # weights' logits; importing the export and exporting it again gives the same files, bit for bit.
    out = export(compose_config(f"export.checkpoint_dir={tag_dir}", f"export.out_dir={tmp_path / 'hf'}"))
    m = ModelConfig.from_dict(store.read_state(tag_dir).config["model"])
    reference = Llama(m).eval()
    reference.load_state_dict(torch.load(written("moe_ep2") / f"weights_step{STOP}.pt"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4
    ids = torch.randint(0, 515, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - reference(ids)).abs().max().item() <= 1e-4
    imported = import_hf(out, tmp_path / "imported")
    again = export(compose_config(f"export.checkpoint_dir={imported}", f"export.out_dir={tmp_path / 'hf2'}"))
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("layout", ["tp2_pp2", "tp2_tied", "pp2_tied"])
def test_export_from_tensor_and_pipeline_layouts(layout, written, tmp_path):
    run_dir = written(layout)
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STOP)
    out = export(compose_config(f"export.checkpoint_dir={tag_dir}", f"export.out_dir={tmp_path / 'hf'}"))
    state = store.read_state(tag_dir)
    m = ModelConfig.from_dict(state.config["model"])
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
    def layout(name, *overrides):
        return universal.layout_of(to_dict(layout_config(tmp_path, tmp_path, name, *overrides)))

    where = tmp_path / "step00000003"
    with pytest.raises(ConfigError, match=r"needs a checkpoint written with parallel.zero_stage>=1\. Resume with "
                                          r"parallel.tp=2 parallel.pp=2 parallel.zero_stage=0"):
        check_layout_change(layout("tp2_pp2", "parallel.zero_stage=0"), layout("single", "parallel.zero_stage=0"), where)
    with pytest.raises(ConfigError, match=r"written with ZeRO-1; .* resume with parallel.zero_stage=1 \(any tp/pp/dp\)"):
        check_layout_change(layout("dp2"), layout("zero3_single"), where)
    zero0_dp8 = layout("tp2_pp2", "parallel.zero_stage=0", "cluster.num_workers=8")  # DP only: no conversion
    assert not universal.needs_universal(layout("tp2_pp2", "parallel.zero_stage=0"), zero0_dp8)


def test_the_plan_says_how_the_checkpoint_resumes(written, bible_shards):
    run_dir = written("dp2")
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STOP)
    same = plan(layout_config(bible_shards, run_dir, "dp2"))
    assert (same.kind, same.tag_dir, same.saved.step, same.load_universal) == (ResumeKind.same_layout, tag_dir, STOP, False)
    other = plan(layout_config(bible_shards, run_dir, "single"))
    assert (other.kind, other.tag_dir, other.load_universal) == (ResumeKind.universal, tag_dir, True)
    assert other.layout == {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "zero_stage": 1}
    assert ("written at tp 1 x pp 1 x dp 2, ZeRO-1, through its universal form at tp 1 x pp 1 x dp 1"
            in other.describe())
    assert plan(layout_config(bible_shards, run_dir, "dp2", "trainer.resume=never")).kind is ResumeKind.fresh
    assert other.existing == store.snapshot(run_dir / "checkpoints")  # what a restart compares against


def test_a_failed_conversion_stops_the_run_with_the_reason_before_any_worker_starts(written, bible_shards, tmp_path):
    run_dir = tmp_path / "run"
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STOP)
    shutil.copytree(written("single") / "checkpoints" / tag_dir.name, tag_dir)
    state = json.loads((tag_dir / store.STATE_FILE).read_text())
    for shard in tag_dir.glob("*optim_states.pt"):  # as if written with ZeRO-0: nothing to convert
        shard.unlink()
        del state["files"][shard.name]
    (tag_dir / store.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="cannot be converted to a universal checkpoint: ValueError: .* no ZeRO "
                                              "optimizer shards"):
        launch.train(layout_config(bible_shards, run_dir, "dp2"))  # the real driver
    assert not (tag_dir / universal.UNIVERSAL_DIR).exists()
    assert not (run_dir / "pids").exists()  # no training worker was started


def test_an_interrupted_conversion_is_cleaned_up_and_redone(written, straight, bible_shards, tmp_path):
    """What a conversion killed mid-way leaves (its temporary folder; a universal folder without its completion
    record) is never used: `distlm checkpoint reshape` removes it and converts again, on Ray tasks."""
    run_dir = tmp_path / "run"
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STOP)
    shutil.copytree(written("tp2_pp2") / "checkpoints" / tag_dir.name, tag_dir)
    partial = tag_dir / universal.UNIVERSAL_DIR
    reshape(tag_dir)  # (the export test may have made it already)
    shutil.copytree(partial, tag_dir / ".universal.tmp4242")  # left by a converter killed before its rename
    (partial / universal.COMPLETE_FILE).unlink()  # a universal folder that never finished
    lost = next(p for p in (partial / "zero").iterdir() if p.name.startswith("layers.1."))
    shutil.rmtree(lost)
    assert "universal form present" not in info(tag_dir)
    out = reshape(tag_dir)
    assert out == partial and universal.is_complete(tag_dir) and (lost / "fp32.pt").is_file()  # redone
    assert not list(tag_dir.glob(".universal.tmp*"))
    record = json.loads((out / universal.COMPLETE_FILE).read_text())
    extract, merge = record["tasks"]  # DeepSpeed's two parallel phases, as Ray tasks
    assert extract["items"] == 4 and extract["tasks"] == 2  # 4 shard files (tp 2 x pp 2) over 2 CPUs
    assert merge["items"] == len(list((out / "zero").glob("*/fp32.pt"))) and merge["tasks"] == 2
    train(layout_config(bible_shards, run_dir, "single"))  # resumes from the redone form
    got = losses(run_dir)
    assert [got[s] for s in (4, 5)] == pytest.approx([straight[4], straight[5]], rel=1e-5)


def test_conversion_tasks_ask_ray_for_memory_and_none_too_large_for_every_node_is_started(ray_local, tmp_path):
    shard = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"")
    os.truncate(shard, 2**20)
    assert universal.task_memory(tmp_path) == 2 * 2**20 + 2**28  # twice the largest shard, + the interpreter
    os.truncate(shard, 2**42)  # a 4 TiB shard (sparse): no node of this cluster has 8 TiB
    with pytest.raises(MemoryError, match=r"needs a node with 8192.2 GiB .* the largest node of the Ray cluster "
                                          r"offers \d+\.\d GiB"):
        universal.task_memory(tmp_path)
