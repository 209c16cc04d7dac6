"""`distlm plan`: parameter counts equal the real model's, model-state memory equals DeepSpeed's own
estimators, start-up host memory and activations follow hand arithmetic, and the verdict names what does
not fit and a layout that does. (tests/test_plan_activations.py checks activations against a real model.)"""

import os
import re
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from distlm.config import ConfigError, compose_config
from distlm.model.llama import Llama
from distlm.plan import (GiB, SEARCHED_KEYS, largest_layer_params, plan, rank_params, suggest_layout, total_params,
                         valid_layouts)


def config(*overrides: str):
    return compose_config("model.vocab_size=32000", "data.seq_len=2048", "trainer.precision=bf16",
                          "cluster.gpu_mem_gb=80", "cluster.host_mem_gb=2048", *overrides)


def gpu_cluster(*overrides: str):
    """conf/cluster/gpu.yaml (8 x 80 GiB per node, 2 TiB host) with Llama-2's vocabulary and context."""
    return compose_config("cluster=gpu", "model.vocab_size=32000", "data.seq_len=4096",
                          "trainer.precision=bf16", "trainer.micro_batch_size=1", "trainer.grad_accum=16", *overrides)


def distlm_plan(tmp_path, *overrides: str) -> str:
    return subprocess.run([sys.executable, "-m", "distlm.cli", "plan", *overrides],
                          capture_output=True, text=True, cwd=tmp_path, check=True).stdout


def printed_gib(out: str, label: str) -> float:
    return float(re.search(rf"{label}\s+([\d,.]+) GiB", out).group(1).replace(",", ""))


# Hand arithmetic for the 70B preset (dim 8192, 80 layers, 64 heads / 8 KV heads of 128, ffn 28672):
BLOCK_70B = 8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672 + 2 * 8192  # q, o; k, v; SwiGLU; two norms
MLP_MATRIX_70B = 28672 * 8192  # the largest tensor with a 4,096-token vocabulary; with 32,000 the embedding is


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
    assert small.fits and small.device_total < 40 * GiB
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
    out = subprocess.run([sys.executable, "-m", "distlm.cli", "plan", "model=7b", "parallel=3d", "cluster=gpu",
                          "cluster.num_workers=64", "cluster.gpu_mem_gb=80", "model.vocab_size=32000",
                          "data.seq_len=4096", "trainer.precision=bf16"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert "6.738 B parameters" in out and "64 GPUs = tp 2 x pp 2 x dp 16" in out and "verdict      fits" in out


def test_startup_host_memory_at_3d_is_the_ranks_stage_slice_plus_one_tensor(tmp_path):
    # the command of the issue, in fp32 as it ran then (bf16 is now the GPU default), with a 4,096-token vocabulary
    out = distlm_plan(tmp_path, "model=70b", "parallel=3d", "cluster=gpu", "cluster.num_workers=64",
                      "trainer.precision=fp32", "trainer.async_checkpoint=false")  # start-up alone sets the peak
    stage = 40 * BLOCK_70B // 2 + 4096 // 2 * 8192 + 8192  # tp 2 x pp 2: half of the last stage's 40 blocks + head
    per_rank = 4 * stage + 4 * MLP_MATRIX_70B + 8 * GiB  # fp32 weights built, one whole tensor, host_overhead_gb
    assert printed_gib(out, "per rank") == pytest.approx(per_rank / GiB, abs=0.01)
    assert printed_gib(out, "per node") == pytest.approx(8 * per_rank / GiB, abs=0.01)  # 581.5 GiB of 2048: fits
    assert "of 2048 GiB (budget 90%: 1,843.2 GiB)   fits" in out
    # fp32 weights 4 B + gradients 4 B of 17.1 B parameters per GPU are already 128 GiB: device is what fails
    verdict = out.split("verdict")[1]
    assert verdict.startswith("      does NOT fit: device memory in training") and "host memory" not in verdict
    assert "suggestion   parallel.tp=8 " in out


def test_startup_host_memory_at_zero3_is_a_64th_of_the_model_plus_one_tensor(tmp_path):
    out = distlm_plan(tmp_path, "model=70b", "parallel=zero3", "cluster=gpu", "cluster.num_workers=64",
                      "trainer.async_checkpoint=false")  # start-up alone sets the peak
    params = 80 * BLOCK_70B + 2 * 4096 * 8192 + 8192
    per_rank = 4 * params / 64 + 4 * MLP_MATRIX_70B + 8 * GiB  # ZeRO-3 partitions each parameter as it is built
    assert printed_gib(out, "per node") == pytest.approx(8 * per_rank / GiB, abs=0.01)  # 102.9 GiB: fits
    assert "verdict      does NOT fit: device memory in training" in out
    assert "suggestion   parallel.activation_checkpoint_interval=1 " in out


def test_70b_in_bf16_at_zero3_on_64_gpus_fits_host_and_device():
    p = plan(gpu_cluster("model=70b", "parallel=zero3", "cluster.num_workers=64",
                         "parallel.activation_checkpoint_interval=1"))
    params = 80 * BLOCK_70B + 2 * 32000 * 8192 + 8192
    startup, checkpoint_copy = 4 * params / 64 + 4 * 32000 * 8192, 12 * params / 64  # fp32 master, Adam m, v
    assert p.host_per_node == pytest.approx(8 * (max(startup, checkpoint_copy) + 8 * GiB))
    # bf16 weights 2 B + fp32 states 16 B per parameter over 64 ranks, + the largest layer gathered (2 + 2 B)
    assert p.model_states == pytest.approx((2 + 16) * params / 64 + 4 * BLOCK_70B)
    assert p.fits and p.problems() == []


def test_verdict_names_host_memory_when_the_node_cannot_build_its_ranks_weights():
    c = gpu_cluster("model=70b", "parallel=3d", "cluster.num_workers=64", "parallel.tp=8", "parallel.pp=2",
                    "cluster.host_mem_gb=128", "trainer.async_checkpoint=false")
    p = plan(c)  # 8 ranks x (16.1 GiB of fp32 weights + 1 GiB embedding + 8 GiB) = 200 GiB > 0.9 x 128 GiB
    assert p.fits_device and not p.fits_host
    assert p.problems() == [f"host memory at start-up: {p.host_per_node / GiB:,.1f} GiB per node > 115.2 GiB budget"]
    changes, fit = suggest_layout(c)
    assert changes == {"pp": 8} and fit.fits_host  # a 64th of the model per rank: 8 x 13.3 GiB


def test_offloaded_optimizer_states_count_in_host_memory_in_training():
    p = plan(gpu_cluster("model=7b", "parallel=zero3", "cluster.num_workers=16", "parallel.offload_optimizer=true",
                         "parallel.offload_params=true"))
    n = p.params
    assert p.offloaded == pytest.approx((16 + 2) * n / 16)  # fp32 weights, gradients, Adam m, v; bf16 weights
    built = 4 * n / 16 + 4 * 32000 * 4096  # a 16th of the fp32 weights + the whole embedding
    assert p.host_per_rank == pytest.approx(max(built, p.offloaded + p.checkpoint_snapshot) + 8 * GiB)


def test_an_asynchronous_checkpoints_host_copy_counts_in_training():
    c = gpu_cluster("model=70b", "parallel=zero3", "cluster.num_workers=64", "cluster.host_mem_gb=160")
    p = plan(c)
    n = p.params  # ZeRO-3 writes no weights in its model file; fp32 master + Adam m, v: 12 B a 64th of each
    assert p.checkpoint_snapshot == pytest.approx(12 * n / 64)
    assert p.host_per_rank == pytest.approx(12 * n / 64 + 8 * GiB)  # above start-up's 4 B a 64th + one tensor
    assert not p.fits_host and "host memory at training (with an asynchronous checkpoint's copy: " \
        "trainer.async_checkpoint=false saves without it)" in p.problems()[0]
    synchronous = plan(gpu_cluster("model=70b", "parallel=zero3", "cluster.num_workers=64", "cluster.host_mem_gb=160",
                                   "trainer.async_checkpoint=false"))
    assert synchronous.checkpoint_snapshot == 0 and synchronous.fits_host
    # bf16 ZeRO-1 at dp 16: data-parallel rank 0 writes the bf16 weights and its 16th of the optimizer states
    p = plan(gpu_cluster("model=7b", "cluster.num_workers=16"))
    assert p.checkpoint_snapshot == pytest.approx(2 * p.params + 12 * p.params / 16)


def test_suggested_layout_fits_and_no_layout_with_fewer_changes_does():
    c = gpu_cluster("model=70b", "parallel=3d", "cluster.num_workers=64")
    assert not plan(c).fits
    changed_and_fits = [(sum(getattr(lay.parallel, k) != getattr(c.parallel, k) for k in SEARCHED_KEYS),
                         plan(lay).fits) for lay in valid_layouts(c)]
    fewest = min(changes for changes, fits in changed_and_fits if fits)
    changes, fit = suggest_layout(c)
    assert fit.fits and len(changes) == fewest


def test_7b_tp8_activations_count_rmsnorms_fp32_copies():
    p = plan(gpu_cluster("model=7b", "parallel.tp=8", "cluster.num_workers=8", "trainer.grad_accum=1"))
    # per token and block in bf16: 2 norms x (fp32 input 4 + normalized 2 + scaled 2) x 4096 + their 1/rms,
    # (q, k, v, attention output: 4 x 4096 x 2 B + log-sum-exp 32 x 4 B) / 8, (4 x 11008 x 2 B) / 8
    block = 2 * (8 * 4096 + 4) + (4 * 4096 * 2 + 32 * 4) / 8 + 4 * 11008 * 2 / 8
    head = 8 * 4096 + 4 + 4 * 32000 / 8 + 8  # final norm, fp32 log-probabilities of its 4000 rows, labels
    assert p.activations_without_checkpointing == pytest.approx(4096 * (32 * block + head + 8))  # 10.03 GiB


def test_host_memory_null_means_this_machines():
    c = compose_config("cluster=local", "cluster.host_mem_gb=null")
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert plan(c).host_budget == pytest.approx(c.cluster.plan_headroom * pages)


@pytest.mark.parametrize("override, message", [
    ("cluster.plan_headroom=1.5", r"cluster.plan_headroom=1.5 must be in \(0, 1\]"),
    ("cluster.host_mem_gb=0", "cluster.host_mem_gb=0.0 must be positive, or null for this machine's memory"),
    ("cluster.host_overhead_gb=-1", "cluster.host_overhead_gb=-1.0 must be >= 0"),
])
def test_wrong_memory_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        plan(config("model=1.3b", "cluster.num_workers=8", override))
