"""`distlm plan`: parameter counts equal the real model's, model-state memory equals DeepSpeed's own
estimators, and the verdict follows the layout."""

import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from distlm.config import ConfigError, compose_config
from distlm.model.llama import Llama
from distlm.plan import GiB, largest_layer_params, plan, rank_params, total_params


def config(*overrides: str):
    return compose_config("data.tokenizer.vocab_size=32000", "data.seq_len=2048", "trainer.precision=bf16",
                          "cluster.gpu_mem_gb=80", *overrides)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_equals_the_model(tie):
    c = compose_config("model=test", f"model.tie_embeddings={tie}", "data.tokenizer.vocab_size=300")
    model = Llama(c.model)
    assert total_params(c.model) == model.num_params() == rank_params(c.model, tp=1, pp=1)


def test_preset_sizes_match_their_names():
    sizes = {m: total_params(config(f"model={m}").model) / 1e9 for m in ("125m", "350m", "1.3b", "7b", "13b", "70b")}
    assert sizes["7b"] == pytest.approx(6.74, abs=0.01) and sizes["13b"] == pytest.approx(13.02, abs=0.01)
    assert sizes["70b"] == pytest.approx(69.0, abs=0.1) and sizes["1.3b"] == pytest.approx(1.25, abs=0.01)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeeds_estimate(offload):
    c = config("model=1.3b", "cluster.num_workers=8", "parallel.zero_stage=2", f"parallel.offload_optimizer={offload}")
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total_params(c.model), num_gpus_per_node=8,
                                                      cpu_offload=offload)
    assert plan(c).model_states == pytest.approx(ds_gpu, rel=1e-6)


def test_zero1_keeps_whole_16bit_gradients_that_zero2_shards():
    n = total_params(config("model=1.3b").model)
    zero1, zero2 = (plan(config("model=1.3b", "cluster.num_workers=8", f"parallel.zero_stage={z}")) for z in (1, 2))
    assert zero1.model_states - zero2.model_states == pytest.approx(2 * n * (1 - 1 / 8), rel=1e-6)


@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_equal_deepspeeds_estimate(offload_optimizer, offload_params):
    c = config("model=7b", "cluster.num_workers=16", "parallel=zero3",
               f"parallel.offload_optimizer={offload_optimizer}", f"parallel.offload_params={offload_params}")
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params(c.model), largest_layer_params(c.model, tp=1), num_gpus_per_node=8, num_nodes=2,
        cpu_offload=offload_optimizer, cpu_offload_params=offload_params)
    assert plan(c).model_states == pytest.approx(ds_gpu, rel=1e-6)


def test_tensor_and_pipeline_parallelism_divide_what_a_rank_holds():
    m = config("model=70b").model
    whole = rank_params(m, tp=1, pp=1)
    assert rank_params(m, tp=8, pp=1) == pytest.approx(whole / 8, rel=0.01)
    assert rank_params(m, tp=8, pp=4) == pytest.approx(whole / 32, rel=0.05)


def test_verdicts():
    small = plan(config("model=1.3b", "cluster.num_workers=8", "trainer.micro_batch_size=1"))
    assert small.fits and small.total < 40 * GiB
    huge = plan(config("model=70b", "cluster.num_workers=8"))
    assert not huge.fits and huge.model_states > 80 * GiB
    sharded = plan(config("model=70b", "cluster.num_workers=64", "parallel.tp=8", "parallel.pp=4",
                          "parallel.activation_checkpoint_interval=1", "trainer.micro_batch_size=1",
                          "trainer.grad_accum=16"))
    assert sharded.fits
    assert sharded.activations_with_checkpointing < sharded.activations_without_checkpointing / 4


def test_impossible_layout_is_refused_with_what_to_change():
    with pytest.raises(ConfigError, match=r"parallel.tp=3 must divide model.n_heads=32 .*valid tp: \[1, 2, 4, 8"):
        plan(config("model=7b", "cluster.num_workers=24", "parallel.tp=3"))
    with pytest.raises(ConfigError, match="ZeRO stages 0 and 1 only; set parallel.zero_stage=1"):
        plan(config("model=7b", "cluster.num_workers=16", "parallel.pp=2", "parallel.zero_stage=3"))


def test_plan_command_prints_the_verdict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distlm.cli", "plan", "model=7b", "parallel=3d",
                          "cluster.num_workers=64", "cluster.gpu_mem_gb=80", "data.tokenizer.vocab_size=32000",
                          "data.seq_len=4096", "trainer.precision=bf16"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert "6.738 B parameters" in out and "64 GPUs = tp 2 x pp 2 x dp 16" in out and "verdict      fits" in out
