"""`distlm import-hf`: a Hugging Face Llama directory becomes a distlm checkpoint that trains at any layout
from exactly those weights, and exports back to the same tensors; `distlm checkpoint info` validates."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from distlm.checkpoint import store
from distlm.config import CheckpointError, compose_config
from distlm.data.loading.loader import ShardLoader
from distlm.hf.export import export
from distlm.hf.generate import generate
from distlm.hf.importer import import_hf
from distlm.train.driver.launch import train
from distlm.train.worker.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf_model(bible_shards, tmp_path_factory) -> Path:
    """A small HF Llama (GQA, untied, bf16-free fp32) saved by transformers, with the shards' tokenizer."""
    out = tmp_path_factory.mktemp("hf_model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(out)
    shutil.copyfile(bible_shards / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return out


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory) -> Path:
    return import_hf(hf_model, tmp_path_factory.mktemp("imported") / "checkpoints").parent


def test_round_trip_hf_distlm_hf_is_bit_identical(hf_model, imported, tmp_path):
    out = export(compose_config(f"export.checkpoint_dir={imported}", f"export.out_dir={tmp_path / 'hf'}"))
    original, again = load_file(hf_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == again.keys() and len(original) == 21
    for name in original:   # the original has no pad token: the export adds one, on a new last row
        assert torch.equal(original[name], again[name][:len(original[name])]), name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 513
    # A sharded export (several safetensors files and an index) imports to the same weights again.
    sharded = export(compose_config(f"export.checkpoint_dir={imported}", f"export.out_dir={tmp_path / 'sharded'}",
                                    "export.max_shard_mb=0.05"))
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    reimported = import_hf(sharded, tmp_path / "reimported")
    assert load_file(reimported / store.WEIGHTS_FILE).keys() == load_file(imported / "step00000000" / store.WEIGHTS_FILE).keys()
    for name, w in load_file(reimported / store.WEIGHTS_FILE).items():
        assert torch.equal(w, again["model." + name if name != "lm_head.weight" else name]), name
    # ... and that import exports bit for bit: its tokenizer has the pad token, so no row is added again.
    twice = export(compose_config(f"export.checkpoint_dir={reimported}", f"export.out_dir={tmp_path / 'twice'}"))
    assert load_file(twice / "model.safetensors").keys() == again.keys()
    assert all(torch.equal(w, again[k]) for k, w in load_file(twice / "model.safetensors").items())
    before, after = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (hf_model, out))
    text = "In the beginning God created the heaven and the earth."
    assert after.get_vocab() == {**before.get_vocab(), "<|pad|>": 512} and after.encode(text).ids == before.encode(text).ids


def test_training_from_an_import_starts_from_its_weights_at_another_layout(hf_model, imported, bible_shards, tmp_path):
    model = json.loads((hf_model / "config.json").read_text())
    c = compose_config(
        "model=test", "model.ffn_dim=160", "model.vocab_size=512", "data.seq_len=64", f"data.dir={bible_shards}",
        f"run_dir={tmp_path}", "cluster.num_workers=2", "parallel=tp2", "trainer.micro_batch_size=8",
        "trainer.max_steps=2", "optimizer.warmup_steps=1", "trainer.eval_every=100", "trainer.eval_batches=1", "logger.wandb=false",
        f"trainer.resume={imported}")
    assert model["intermediate_size"] == c.model.ffn_dim
    train(c)
    first_loss = next(r["loss"] for r in read_metrics(tmp_path) if r.get("step") == 1)
    # The HF model's loss on the first global batch: what step 1 computes, before its update.
    loader = ShardLoader(c.data, split="train", micro_batch_size=8, dp_rank=0, dp_size=1, seed=c.seed, shuffle=True)
    batch = torch.as_tensor(next(iter(loader.iter_batches())))
    hf = LlamaForCausalLM.from_pretrained(hf_model).eval()
    with torch.no_grad():
        logits = hf(input_ids=batch[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    assert first_loss == pytest.approx(expected, rel=1e-5)
    assert store.find_latest(tmp_path / "checkpoints") == "step00000002"  # a run of its own from there


def distlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distlm.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_checkpoint_info_describes_and_validates(imported, tmp_path):
    result = distlm("checkpoint", "info", str(imported))
    assert result.returncode == 0, result.stderr
    assert "step        0" in result.stdout and "weights only" in result.stdout and "vocab 512" in result.stdout
    damaged = tmp_path / "checkpoints"
    shutil.copytree(imported, damaged)
    weights = damaged / "step00000000" / store.WEIGHTS_FILE
    state = json.loads((weights.parent / store.STATE_FILE).read_text())
    state["files"] = {store.WEIGHTS_FILE: weights.stat().st_size}
    (weights.parent / store.STATE_FILE).write_text(json.dumps(state))
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a crash mid-copy
    result = distlm("checkpoint", "info", str(damaged / "step00000000"))
    assert result.returncode == 1
    assert "step00000000 is corrupt: model.safetensors has 1000 bytes" in result.stderr


def test_import_refuses_what_distlm_cannot_compute(hf_model, tmp_path):
    bad = tmp_path / "scaled"
    shutil.copytree(hf_model, bad)
    config = json.loads((bad / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not support RoPE scaling 'linear'"):
        import_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_from_a_checkpoint_is_generate_from_its_hf_model(hf_model, imported):
    greedy = ["generate.temperature=0", "generate.max_new_tokens=12", "generate.prompt='And God said'"]
    from_hf = generate(compose_config(f"generate.model_dir={hf_model}", *greedy))
    from_checkpoint = generate(compose_config(f"generate.model_dir={imported}", *greedy))
    assert from_checkpoint == from_hf and len(from_hf) > 0


def test_a_llama3_rope_scaled_model_imports_and_exports_with_the_same_logits(bible_shards, tmp_path):
    """Long-context RoPE (Llama 3 scaling): distlm's frequencies are transformers' own, so the import trains and
    exports with the logits of the original; the export's verification compares them at long positions too."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from distlm.config import ModelConfig
    from distlm.model.llama import Llama, rope_frequencies

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
                         rope_parameters=rope)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path / "hf")
    shutil.copyfile(bible_shards / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))

    tag_dir = import_hf(tmp_path / "hf", tmp_path / "imported")
    m = ModelConfig.from_dict(store.read_state(tag_dir).config["model"])
    assert m.rope_scaling is not None and m.rope_scaling.original_max_seq_len == 64
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    unscaled = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**{**config.to_dict(), "rope_parameters": {
        **rope, "factor": 1.0}}))[0]
    assert not torch.allclose(theirs, unscaled)   # the scaling changes frequencies: the check can fail
    torch.testing.assert_close(rope_frequencies(m), theirs, rtol=0, atol=0)

    ids = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(1))
    ours = Llama(m).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in original.state_dict().items()})
    with torch.no_grad():
        assert (ours(ids) - original(input_ids=ids).logits).abs().max().item() <= 1e-4
    out = export(compose_config(f"export.checkpoint_dir={tag_dir}", f"export.out_dir={tmp_path / 'out'}"))
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    with torch.no_grad():
        exported = LlamaForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits[..., :512]   # not the pad row
    assert (exported - original(input_ids=ids).logits).abs().max().item() <= 1e-4
