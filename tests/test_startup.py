"""Start-up without the whole model: each rank builds only its part (for a pipeline, the layers
parallel.pipeline_partition gives its stage), and the initial weights are the same numbers in every layout as in one
process, bit for bit (real gloo ranks, real DeepSpeed engines)."""

from pathlib import Path

import deepspeed
import pytest
import torch
from distributed import run_ranks
from safetensors.torch import save_file

from distlm.config import compose_config
from distlm.model.materialize import InitialWeights, SafetensorsWeights, canonical_name, full_shapes
from distlm.model.parallelize import full_state_dict
from distlm.parallel.layout import make_layout
from distlm.plan import stage_blocks
from distlm.train.worker.engine import build_engine

# name: (world size, overrides)
LAYOUTS = {
    "tp2_pp2": (4, ["parallel=tp2_pp2", "trainer.micro_batch_size=1", "trainer.grad_accum=2"]),
    "zero3_dp2": (2, ["parallel=zero3", "trainer.micro_batch_size=1"]),
    "tp2_zero3_dp2": (4, ["parallel=tp2", "parallel.zero_stage=3", "trainer.micro_batch_size=1"]),
}


def model_config(world: int, *overrides: str):
    # A vocabulary of 515 is odd: tensor parallelism pads it, and the padding must not show.
    return compose_config("model=test", "model.vocab_size=515", "data.seq_len=64", f"cluster.num_workers={world}",
                          "logger.wandb=false", *overrides)


def _gather_built(rank: int, c, out: Path, weights: Path | None) -> None:
    layout = make_layout(c.parallel.tp, c.parallel.pp)
    engine = build_engine(c, layout, weights=weights)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO-3
        gathered = full_state_dict(engine.module, layout, c.model.vocab_size)
    if rank == 0:
        torch.save(gathered, out)


def built_weights(world: int, c, out: Path, weights: Path | None = None) -> dict[str, torch.Tensor]:
    run_ranks(_gather_built, world, c, out, weights)
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    return built_weights(1, model_config(1, "trainer.micro_batch_size=2"), tmp_path_factory.mktemp("one") / "w.pt")


def assert_bit_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("name", LAYOUTS)
def test_initial_weights_equal_one_process_bit_for_bit(name, one_process, tmp_path):
    world, overrides = LAYOUTS[name]
    assert_bit_equal(built_weights(world, model_config(world, *overrides), tmp_path / "w.pt"), one_process)


def test_initial_weights_follow_the_init_rule(one_process):
    c = model_config(1)
    assert one_process.keys() == full_shapes(c.model).keys()
    assert torch.equal(one_process["norm.weight"], torch.ones(c.model.dim))
    std = one_process["layers.0.mlp.up_proj.weight"].std().item()
    scaled = one_process["layers.0.mlp.down_proj.weight"].std().item()
    assert std == pytest.approx(c.model.init_std, rel=0.05)
    assert scaled == pytest.approx(c.model.init_std / (2 * c.model.n_layers) ** 0.5, rel=0.05)
    q0, q1 = one_process["layers.0.self_attn.q_proj.weight"], one_process["layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)  # each tensor has its own streams


def test_any_slice_is_drawn_as_part_of_the_whole_tensor():
    c = model_config(1)
    source, shape = InitialWeights(c.model, seed=3), torch.Size([5000, 300])  # several blocks of rows
    whole = source.rows("layers.0.mlp.up_proj.weight", shape, 0, 5000, slice(None))
    part = source.rows("layers.0.mlp.up_proj.weight", shape, 3001, 4999, slice(150, 300))
    assert torch.equal(part, whole[3001:4999, 150:300])


def test_imported_weights_are_read_by_slice_into_every_layout(one_process, tmp_path):
    imported = {k: torch.randn(v.shape) for k, v in one_process.items()}
    save_file(imported, tmp_path / "model.safetensors")
    world, overrides = LAYOUTS["tp2_pp2"]
    got = built_weights(world, model_config(world, *overrides), tmp_path / "w.pt", tmp_path / "model.safetensors")
    assert_bit_equal(got, imported)


def test_imported_weights_of_another_shape_are_refused_naming_the_file(one_process, tmp_path):
    imported = {k: torch.zeros(v.shape) for k, v in one_process.items()}
    imported["norm.weight"] = torch.zeros(7)
    save_file(imported, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors.*wrong shape \['norm.weight \(7,\)"):
        SafetensorsWeights(tmp_path / "model.safetensors", model_config(1).model)


# ---------------------------------------------------------------- parallel.pipeline_partition: who builds which layer

def _stage_layers(rank: int, out: Path) -> None:
    """Build model=test with 4 blocks and a 4,096-token vocabulary as 3 pipeline stages, once per partition method;
    write the layers this rank holds. Pipelines last: DeepSpeed's global state then breaks other engines."""
    held = {}
    for method in ("blocks", "parameters", "uniform"):
        c = model_config(3, "model.n_layers=4", "model.vocab_size=4096", "parallel.pp=3", "trainer.micro_batch_size=1",
                         "trainer.grad_accum=3", f"parallel.pipeline_partition={method}")
        engine = build_engine(c, make_layout(1, 3))
        held[method] = sorted({layer_of(canonical_name(name)) for name, _ in engine.module.named_parameters()})
    torch.save(held, out / f"rank{rank}.pt")


def layer_of(name: str) -> str:
    """`layers.2.mlp.up_proj.weight` -> `layers.2`; `embed_tokens.weight` -> `embed_tokens`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def test_pipeline_partition_decides_which_layers_each_stage_builds(tmp_path):
    """The layers are the embedding, 4 blocks and the head (norm + lm_head). With a 4,096 x 64 embedding (262 k
    parameters) against blocks of 46 k: `blocks` spreads the blocks evenly (the first stage takes the extra one),
    `parameters` balances counts (each embedding outweighs the four blocks together), `uniform` gives every stage
    2 of the 6 layers."""
    run_ranks(_stage_layers, 3, tmp_path)
    stages = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    embed, head, block = "embed_tokens", ["lm_head", "norm"], lambda *i: [f"layers.{k}" for k in i]
    assert [s["blocks"] for s in stages] == [[embed, *block(0, 1)], block(2), [*block(3), *head]]
    assert [s["parameters"] for s in stages] == [[embed], block(0, 1, 2, 3), head]
    assert [s["uniform"] for s in stages] == [[embed, *block(0)], block(1, 2), [*block(3), *head]]
    # distlm plan assumes the `blocks` split when it sizes a stage.
    assert stage_blocks(4, 3) == [sum(n.startswith("layers.") for n in s["blocks"]) for s in stages]


def _zero3_partitions(rank: int, c, out: Path) -> None:
    opt = build_engine(c, make_layout(1, 1)).optimizer
    weights, master = opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat
    shared = all(m.data_ptr() == w.data_ptr() for m, w in zip(master, weights))
    out.write_text(f"{weights[0].dtype} {master[0].dtype} shared={shared}")


@pytest.mark.parametrize("precision, expected", [("fp32", "torch.float32 torch.float32 shared=True"),
                                                 ("bf16", "torch.bfloat16 torch.float32 shared=False")])
def test_zero3_holds_weights_in_the_training_dtype_and_fp32_master_weights_once(precision, expected, tmp_path):
    # DeepSpeed's ZeRO-3 optimizer reuses fp32 weights as its master weights (distlm/train/worker/engine.py); bf16
    # weights (built as bf16 partitions: distlm/model/materialize.py) need their fp32 master copy.
    out = tmp_path / "partitions.txt"
    run_ranks(_zero3_partitions, 1, model_config(1, "parallel=zero3", "trainer.micro_batch_size=2",
                                                 f"trainer.precision={precision}"), out)
    assert out.read_text() == expected
