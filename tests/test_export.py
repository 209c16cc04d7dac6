"""Hugging Face export and generation, from real DeepSpeed checkpoints written by 2 gloo ranks on CPU."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from distlm.checkpoint import store
from distlm.checkpoint.store import RunState
from distlm.config import CheckpointError, Config, ConfigError, ExportDtype, compose_config, to_dict
from distlm.hf.export import SHARD_INDEX_FILE, add_v4_keys, export, export_memory_bytes
from distlm.hf.generate import generate
from distlm.hf.verify import LOGIT_TOLERANCE, verify
from distlm.model.llama import Llama
from distlm.parallel.layout import make_layout
from distlm.train.worker.engine import build_engine

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
VOCAB = 320
SEQ = 32
SAVE_AT = (2, 3)  # steps after which each run saves; keep=2 leaves both tags
RUNS = {  # name -> config overrides
    "zero0": ["parallel.zero_stage=0"],
    "zero1": ["parallel.zero_stage=1"],
    "zero3": ["parallel.zero_stage=3"],
    "zero1_tied": ["parallel.zero_stage=1", "model.tie_embeddings=true"],
    "zero3_tied": ["parallel.zero_stage=3", "model.tie_embeddings=true"],
    "zero1_bf16": ["parallel.zero_stage=1", "trainer.precision=bf16"],
    # A vocabulary of odd size (the tokenizer's 320 tokens plus unused rows), tied and untied.
    "zero1_vocab515": ["parallel.zero_stage=1", "model.vocab_size=515"],
    "zero3_tied_vocab515": ["parallel.zero_stage=3", "model.tie_embeddings=true", "model.vocab_size=515"],
}
FP32_RUNS = [name for name in RUNS if "bf16" not in name]
TEXT = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Numbers like 1234 and 56.78 appear too, with punctuation: (yes!)",
]


@dataclass
class Run:
    cfg: Config
    root: Path  # checkpoints/ and reference/ (the trained weights, gathered apart from the checkpoint)

    @property
    def ckpt_dir(self) -> Path:
        return self.root / "checkpoints"

    def reference_model(self, step: int = SAVE_AT[-1]) -> Llama:
        model = Llama(self.cfg.model).eval()
        model.load_state_dict(torch.load(self.root / "reference" / f"{store.tag_for_step(step)}.pt"))
        return model


def _train_and_save(rank: int, runs: list[Run], tokenizer_file: Path) -> None:
    sha = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    for run in runs:
        c = run.cfg
        torch.manual_seed(c.seed)
        engine = build_engine(c, make_layout(tp=1, pp=1))
        data = torch.Generator().manual_seed(rank)
        for step in range(1, SAVE_AT[-1] + 1):
            ids = torch.randint(0, VOCAB, (c.trainer.micro_batch_size, SEQ + 1), generator=data)
            engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]))
            engine.step()
            if step not in SAVE_AT:
                continue
            state = RunState(step=step, samples_seen=step * c.global_batch_size,
                             tokens_seen=step * c.global_batch_size * SEQ, config=to_dict(c), tokenizer_sha256=sha)
            store.save(engine, run.ckpt_dir, state, tokenizer_file, keep=2)
            # The live weights, gathered by ZeRO-3 (a no-op otherwise): what the export must reproduce.
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                if rank == 0:
                    (run.root / "reference").mkdir(exist_ok=True)
                    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                    torch.save(weights, run.root / "reference" / f"{store.tag_for_step(step)}.pt")
            dist.barrier()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    assert tok.token_to_id(EOS) == 0
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_file) -> dict[str, Run]:
    """One 2-rank job trains every run for 3 steps and saves after steps 2 and 3."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, overrides in RUNS.items():
        cfg = compose_config("model=test", f"data.tokenizer.vocab_size={VOCAB}", f"data.seq_len={SEQ}",
                          "cluster.num_workers=2", "trainer.micro_batch_size=2", "trainer.grad_accum=1",
                          "trainer.max_steps=3", "optimizer.warmup_steps=1", f"run_dir={base / name}", *overrides)
        runs[name] = Run(cfg, base / name)
    run_ranks(_train_and_save, 2, list(runs.values()), tokenizer_file)
    return runs


def export_config(source: Path, out_dir: Path, *overrides: str) -> Config:
    return compose_config(f"export.checkpoint_dir={source}", f"export.out_dir={out_dir}", *overrides)


@pytest.fixture(scope="module")
def zero1_export(runs, tmp_path_factory) -> Path:
    return export(export_config(runs["zero1"].ckpt_dir, tmp_path_factory.mktemp("export") / "hf"))


def fixed_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def hf_model(path: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def model_logits(hf) -> torch.Tensor:
    """An export's logits of fixed_ids() over the model's vocabulary (without a pad row the export added)."""
    return hf(input_ids=fixed_ids()).logits[..., :VOCAB if hf.config.vocab_size == VOCAB + 1 else None]


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def assert_same_weights(hf, ours) -> None:
    """In fp32 training the master weights are the live ones: the export holds them bit for bit, and a pad
    token's new row (a model whose tokenizer fills its vocabulary) is the mean of the rows."""
    hf_weights = hf.state_dict()
    for k, w in ours.state_dict().items():
        exported = hf_weights[hf_name(k)]
        assert torch.equal(exported[:len(w)], w), k
        if len(exported) > len(w):
            assert len(exported) == len(w) + 1 and torch.allclose(exported[-1], w.mean(0)), k


@pytest.mark.parametrize("name", FP32_RUNS)
def test_export_reproduces_the_trained_model(name, runs, tmp_path):
    run = runs[name]
    out = export(export_config(run.ckpt_dir, tmp_path / "hf"))
    hf, ours = hf_model(out), run.reference_model()
    assert_same_weights(hf, ours)
    with torch.no_grad():
        ref, got = ours(fixed_ids()), model_logits(hf)
    assert ref.abs().max() > 0.1  # logits large enough for the comparison to mean something
    assert (ref - got).abs().max().item() <= 1e-4
    if run.cfg.model.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        with safe_open(out / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_the_checkpoints_cover_gqa_tied_and_untied_embeddings_and_an_odd_vocabulary(runs):
    # What the ranks trained and saved (the checkpoints' own config), not what this file asked for.
    models = [store.read_state(run.ckpt_dir / store.find_latest(run.ckpt_dir)).config["model"] for run in runs.values()]
    assert all(m["n_kv_heads"] < m["n_heads"] for m in models)  # grouped-query attention in every parity test
    assert {m["tie_embeddings"] for m in models} == {True, False}
    assert {m["vocab_size"] for m in models} == {VOCAB, 515}


@pytest.mark.parametrize("name", ["zero1", "zero3_tied_vocab515"])
def test_sharded_export_has_transformers_index_and_the_same_logits(name, runs, tmp_path):
    run = runs[name]
    limit = 50_000  # bytes; the test model's 0.5 MB of fp32 weights need several files
    out = export(export_config(run.ckpt_dir, tmp_path / "hf", f"export.max_shard_mb={limit / 1e6}"))
    index = json.loads((out / SHARD_INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (out / "model.safetensors").exists()
    assert files == sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for file in files:  # each file holds what the index says, within the limit unless one tensor is larger
        with safe_open(out / file, "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == file}
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total

    hf, ours = hf_model(out), run.reference_model()
    assert_same_weights(hf, ours)
    with torch.no_grad():
        logits = model_logits(hf)
        assert (ours(fixed_ids()) - logits).abs().max().item() <= 1e-4
    # transformers' own sharding of the same model: the same index, up to which file holds which tensor.
    hf.save_pretrained(tmp_path / "by_transformers", max_shard_size=limit)
    theirs = json.loads((tmp_path / "by_transformers" / SHARD_INDEX_FILE).read_text())
    assert index["metadata"] == theirs["metadata"] and index["weight_map"].keys() == theirs["weight_map"].keys()
    assert ("lm_head.weight" in index["weight_map"]) == (not run.cfg.model.tie_embeddings)


def test_export_refuses_a_shard_size_that_is_not_positive(tmp_path):
    with pytest.raises(ConfigError, match="export.max_shard_mb=0.0 must be positive"):
        export(export_config(tmp_path, tmp_path / "hf", "export.max_shard_mb=0"))


def test_bf16_training_exports_the_fp32_master_weights(runs, tmp_path):
    run = runs["zero1_bf16"]
    out = export(export_config(run.ckpt_dir, tmp_path / "hf"))
    hf_weights = hf_model(out).state_dict()
    live = run.reference_model().state_dict()  # bf16 copies of the master weights
    assert all(w.dtype == torch.float32 for w in hf_weights.values())
    exported = {k: hf_weights[hf_name(k)][:len(w)] for k, w in live.items()}   # without the pad row
    assert any(not torch.equal(exported[k], w.float()) for k, w in live.items())  # more than bf16 bits
    for k, w in live.items():
        assert torch.equal(exported[k].to(torch.bfloat16), w), k


def test_export_of_an_older_tag(runs, tmp_path):
    run = runs["zero3"]
    out = export(export_config(run.ckpt_dir, tmp_path / "hf", f"export.tag={store.tag_for_step(2)}"))
    with torch.no_grad():
        ref, got = run.reference_model(step=2)(fixed_ids()), model_logits(hf_model(out))
        newer = run.reference_model(step=3)(fixed_ids())
    assert (ref - got).abs().max().item() <= 1e-4
    assert (newer - got).abs().max().item() > 1e-3


def test_verification_rejects_an_export_of_other_weights(runs, zero1_export):
    run = runs["zero1"]
    older = run.reference_model(step=2).state_dict()
    with pytest.raises(RuntimeError, match="does not reproduce the checkpoint"):
        verify(zero1_export, run.cfg.model, older.__getitem__, ExportDtype.fp32)


def test_tokenizer_round_trips_text_and_knows_eos(zero1_export):
    tok = AutoTokenizer.from_pretrained(zero1_export)
    text = "In the beginning, a fox (1234) was é\n  unknown-ish!"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == EOS and tok.eos_token_id == 0
    assert tok(EOS).input_ids == [0]


def test_config_json_describes_the_model(zero1_export, runs):
    m = runs["zero1"].cfg.model
    cfg = json.loads((zero1_export / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    # One row more than the model: the pad token the export added (the tokenizer fills all 320 rows).
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (VOCAB + 1, m.dim, m.ffn_dim)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == \
        (m.n_layers, m.n_heads, m.n_kv_heads)
    assert cfg["head_dim"] == m.dim // m.n_heads and cfg["max_position_embeddings"] == SEQ
    assert cfg["rms_norm_eps"] == m.norm_eps
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": m.rope_theta}
    assert cfg["tie_word_embeddings"] is False and cfg["dtype"] == "float32"
    assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"]) == (0, 0, VOCAB)
    gen = json.loads((zero1_export / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (0, 0, VOCAB)


def test_the_export_carries_the_keys_transformers_4_reads(zero1_export, runs):
    """transformers 4.x reads `torch_dtype`, `rope_theta` and `rope_scaling` where 5.x reads `dtype` and
    `rope_parameters`, and knows no `TokenizersBackend` tokenizer class (the next test loads the export with a
    4.x release where one is given); 5.x reads both spellings to the same config."""
    cfg = json.loads((zero1_export / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["rope_theta"] == runs["zero1"].cfg.model.rope_theta and cfg["rope_scaling"] is None
    tok_cfg = json.loads((zero1_export / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_cfg["eos_token"], tok_cfg["bos_token"], tok_cfg["pad_token"]) == (EOS, EOS, "<|pad|>")


TRANSFORMERS4 = os.environ.get("DISTLM_TRANSFORMERS4_PYTHON")   # a python whose transformers is a 4.x release


@pytest.mark.skipif(not TRANSFORMERS4, reason="set DISTLM_TRANSFORMERS4_PYTHON to a python with transformers 4.x "
                                             "(e.g. a venv with `pip install transformers==4.46.3 torch==2.13.0`)")
def test_transformers_4_loads_the_export_and_computes_its_logits(zero1_export, runs):
    script = f"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
tok = AutoTokenizer.from_pretrained({str(zero1_export)!r})
model = AutoModelForCausalLM.from_pretrained({str(zero1_export)!r}).eval()
ids = torch.tensor(json.loads(sys.argv[1]))
with torch.no_grad():
    logits = model(input_ids=ids).logits[..., :{VOCAB}]
print(json.dumps({{"class": type(tok).__name__, "pad": tok.pad_token_id, "eos": tok.eos_token_id,
                   "dtype": str(model.dtype), "logits": logits.tolist()}}))
"""
    done = subprocess.run([TRANSFORMERS4, "-c", script, json.dumps(fixed_ids().tolist())], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert (got["class"], got["pad"], got["eos"], got["dtype"]) == ("PreTrainedTokenizerFast", VOCAB, 0, "torch.float32")
    with torch.no_grad():
        ref = runs["zero1"].reference_model()(fixed_ids())
    assert (ref - torch.tensor(got["logits"])).abs().max().item() <= LOGIT_TOLERANCE[ExportDtype.fp32] * max(1.0, ref.abs().max().item())


def test_llama3_rope_scaling_is_written_in_both_spellings(runs, tmp_path):
    scaled = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = {"rope_scaling": scaled, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, **scaled},
           "dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    add_v4_keys(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == {"rope_type": "llama3", **scaled} and written["rope_theta"] == 10000.0


def test_the_pad_token_takes_a_spare_embedding_row_when_there_is_one(runs, tmp_path):
    out = export(export_config(runs["zero1_vocab515"].ckpt_dir, tmp_path / "hf"))
    cfg = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert cfg["vocab_size"] == 515 and tok.pad_token == "<|pad|>" and tok.pad_token_id == cfg["pad_token_id"] == VOCAB


def test_lora_fine_tuning_with_transformers_collator_still_learns_to_end_with_eos(zero1_export):
    """What a fine-tuning stack does with the export: LoRA (peft) and DataCollatorForLanguageModeling, which sets
    the labels of pad_token_id to -100; with pad = EOS it would hide every EOS from the loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(zero1_export)
    torch.manual_seed(0)
    model = get_peft_model(hf_model(zero1_export), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                             modules_to_save=["lm_head"]))
    texts = ["And God said, Let there be light", "The quick brown fox"]
    collate = DataCollatorForLanguageModeling(tok, mlm=False)
    batch = collate([tok(t + tok.eos_token) for t in texts])   # padded to the longer one
    assert (batch["labels"] == tok.eos_token_id).sum() == len(texts)   # every EOS is a label; padding is not
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    model.eval()
    prompt = tok("The quick", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out[0, -1].item() == tok.eos_token_id, tok.decode(out[0])   # it learned to stop
    assert tok.decode(out[0], skip_special_tokens=True) == texts[1]


def test_bf16_export_loads_and_is_close(runs, zero1_export, tmp_path):
    run = runs["zero1"]
    out = export(export_config(run.ckpt_dir, tmp_path / "hf", "export.dtype=bf16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_model(out, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref, got = run.reference_model()(fixed_ids()), model_logits(hf).float()
    assert (ref - got).abs().max().item() <= LOGIT_TOLERANCE[ExportDtype.bf16] * max(1.0, ref.abs().max().item())
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.6 * (zero1_export / "model.safetensors").stat().st_size


def test_generate_greedy_is_deterministic_and_matches_distlm(zero1_export, runs, capsys):
    c = compose_config(f"generate.model_dir={zero1_export}", "generate.temperature=0", "generate.max_new_tokens=12")
    first, second = generate(c), generate(c)
    assert first == second
    assert capsys.readouterr().out == 2 * (c.generate.prompt + first + "\n")  # the continuation may hold newlines

    # distlm's own greedy decoding of the same prompt gives the same text, of the requested length.
    tok = AutoTokenizer.from_pretrained(zero1_export)
    ids = tok(c.generate.prompt, return_tensors="pt").input_ids
    model = runs["zero1"].reference_model()
    new = []
    with torch.no_grad():
        while len(new) < c.generate.max_new_tokens and (not new or new[-1] != tok.eos_token_id):
            new.append(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1))[0, -1].argmax().item())
    assert tok.eos_token_id in new or len(new) == c.generate.max_new_tokens
    assert first == tok.decode(new, skip_special_tokens=True)


def test_generate_sampling_follows_the_seed(zero1_export):
    overrides = [f"generate.model_dir={zero1_export}", "generate.temperature=1.0", "generate.max_new_tokens=20"]
    a, b = generate(compose_config(*overrides, "generate.seed=1")), generate(compose_config(*overrides, "generate.seed=1"))
    c = generate(compose_config(*overrides, "generate.seed=2"))
    assert a == b and a != c


def test_generate_from_a_missing_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        generate(compose_config(f"generate.model_dir={tmp_path / 'nothing'}"))


@pytest.mark.parametrize("run_name, damage, message", [
    ("zero1", "delete zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
    ("zero3", "truncate zero_pp_rank_0_mp_rank_00_optim_states.pt",
     r"zero_pp_rank_0_mp_rank_00_optim_states.pt has \d+ bytes, \d+ when it was saved"),
    ("zero0", "truncate mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt has"),
    ("zero0", "delete mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt is missing"),
    ("zero1", "delete distlm_state.json", "distlm_state.json is missing"),
    # A file the state does not list (as in checkpoints written before files were listed): the reader names it.
    ("zero3", "forget zero_pp_rank_1_mp_rank_00_optim_states.pt", r"over 2 ranks needs their 2 optimizer files; found ranks \[0\]"),
])
def test_damaged_checkpoint_is_named_and_leaves_no_export(run_name, damage, message, runs, tmp_path):
    ckpt_dir = shutil.copytree(runs[run_name].ckpt_dir, tmp_path / "checkpoints")
    tag_dir = ckpt_dir / store.find_latest(ckpt_dir)
    action, file = damage.split()
    if action == "truncate":
        data = (tag_dir / file).read_bytes()
        (tag_dir / file).write_bytes(data[: len(data) // 2])
    else:
        (tag_dir / file).unlink()
    if action == "forget":
        state = json.loads((tag_dir / store.STATE_FILE).read_text())
        del state["files"][file]
        (tag_dir / store.STATE_FILE).write_text(json.dumps(state))
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match=message) as err:
        export(export_config(tag_dir, out))
    assert str(tag_dir) in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]  # no export, no temporary directory


def test_export_refuses_to_replace_a_foreign_directory(runs, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a Hugging Face model directory"):
        export(export_config(runs["zero1"].ckpt_dir, tmp_path / "hf"))
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_export_replaces_an_earlier_export(runs, tmp_path):
    run = runs["zero1"]
    export(export_config(run.ckpt_dir, tmp_path / "hf", f"export.tag={store.tag_for_step(2)}"))
    out = export(export_config(run.ckpt_dir, tmp_path / "hf"))
    with torch.no_grad():
        ref, got = run.reference_model()(fixed_ids()), model_logits(hf_model(out))
    assert (ref - got).abs().max().item() <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_the_export_command_converts_one_tag_directory(runs, tmp_path):
    tag_dir = runs["zero3_tied"].ckpt_dir / store.tag_for_step(3)
    out = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "distlm.cli", "export", f"export.checkpoint_dir={tag_dir}",
                           f"export.out_dir={out}"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "max |Δlogits|" in proc.stdout  # Hydra logs to stdout
    with torch.no_grad():
        ref, got = runs["zero3_tied"].reference_model()(fixed_ids()), model_logits(hf_model(out))
    assert (ref - got).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- memory: the export streams the model

DEEP = ["model.dim=256", "model.n_layers=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=704"]
MEASURE_EXPORT = """\
import json, sys
from distlm.config import compose_config
from distlm.hf.export import export

def status(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024

warm_up, *overrides = sys.argv[1:]
export(compose_config(f"export.checkpoint_dir={warm_up}", f"export.out_dir={warm_up}.hf"))  # imports, code pages
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
export(compose_config(*overrides))
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""
# glibc raises its mmap threshold (up to 32 MB) as blocks are freed and then keeps freed blocks below it in
# its heap; the test model's tensors (< 1 MB) would measure that cache. A real model's tensors are larger.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _save_untrained(rank: int, cfg: Config, tokenizer_file: Path) -> None:
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg, make_layout(tp=1, pp=1))
    sha = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    store.save(engine, Path(cfg.run_dir) / "checkpoints", RunState(config=to_dict(cfg), tokenizer_sha256=sha),
               tokenizer_file, keep=1)


def test_export_memory_is_a_few_tensors_not_the_model(runs, tokenizer_file, tmp_path):
    """ZeRO-3 over 2 ranks (the weights in the optimizer's partitions), 32 layers (≈ 95 MB of fp32 weights),
    exported into 1 MB files and verified: the export's peak memory above a process that has exported once
    (libraries loaded) is a small part of the model."""
    cfg = compose_config(*DEEP, f"data.tokenizer.vocab_size={VOCAB}", f"data.seq_len={SEQ}", "cluster.num_workers=2",
                         "trainer.micro_batch_size=1", "trainer.grad_accum=1", "parallel.zero_stage=3",
                         f"run_dir={tmp_path / 'run'}")
    run_ranks(_save_untrained, 2, cfg, tokenizer_file)
    model_bytes = 4 * Llama(cfg.model).num_params()
    warm_up = shutil.copytree(runs["zero3"].ckpt_dir, tmp_path / "warm_up")
    proc = subprocess.run([sys.executable, "-c", MEASURE_EXPORT, str(warm_up), f"export.checkpoint_dir={tmp_path / 'run' / 'checkpoints'}",
                           f"export.out_dir={tmp_path / 'hf'}", "export.max_shard_mb=1"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **MALLOC_ENV}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["base"]
    print(f"export peak above start: {growth / 2**20:.1f} MiB for {model_bytes / 2**20:.1f} MiB of fp32 weights; "
          f"process peak {measured['peak'] / 2**20:.0f} MiB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 50
    assert growth < model_bytes / 4
    # What a submitted export asks Ray for (distlm/submit.py) covers the whole process as measured.
    assert measured["peak"] < export_memory_bytes(cfg.model, 1)


def test_verification_catches_one_wrong_weight_deep_in_the_model(runs, zero1_export):
    run = runs["zero1"]
    weights = run.reference_model().state_dict()
    verify(zero1_export, run.cfg.model, weights.__getitem__, ExportDtype.fp32)  # the right weights pass
    wrong = dict(weights)
    name = f"layers.{run.cfg.model.n_layers - 1}.mlp.down_proj.weight"
    wrong[name] = weights[name].clone()
    wrong[name][0, 0] += 0.5  # one element of the last block
    with pytest.raises(RuntimeError, match="does not reproduce the checkpoint"):
        verify(zero1_export, run.cfg.model, wrong.__getitem__, ExportDtype.fp32)


def test_submitted_export_asks_for_a_worker_with_the_memory_of_the_checkpoints_model(runs, tmp_path):
    """The sizing rule (distlm/hf/export.py), by hand: 3 GiB for the process, one output file, and 4 copies of the
    largest module's fp32 tensors (a block, or the vocabulary x dim embedding)."""
    from distlm.submit import job_resources

    run = runs["zero1"]
    # model=70b: the composed model.* keys are not the checkpoint's; the checkpoint's model decides. model=test
    # (dim 64, 4 / 2 heads of 16, ffn 176): a block's q, o, k, v and SwiGLU outweigh the 320 x 64 embedding.
    c = export_config(run.ckpt_dir, tmp_path / "hf", "model=70b", "export.max_shard_mb=100")
    test_block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176
    assert job_resources("export", c) == {"entrypoint_num_cpus": 1,  # the head offers no CPU: a worker node
                                          "entrypoint_memory": 3 * 2**30 + 100 * 10**6 + 4 * 4 * test_block}
    # Without the checkpoint, model.*: 70B's block (dim 8192, 64 / 8 heads of 128, ffn 28672), default 5000 MB files.
    elsewhere = job_resources("export", export_config(tmp_path / "not_here", tmp_path / "hf", "model=70b"))
    block_70b = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    assert elsewhere["entrypoint_memory"] == 3 * 2**30 + 5000 * 10**6 + 4 * 4 * block_70b  # 20.4 GiB, not 280 GB
    assert job_resources("train", c) == {}
