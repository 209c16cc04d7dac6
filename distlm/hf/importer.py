"""`distlm import-hf HF_DIR OUT_DIR`: a local Hugging Face Llama or Mixtral directory -> a distlm checkpoint.

The checkpoint holds the weights (fp32, one-process distlm names), the tokenizer and a run state at step 0;
it has no layout, so any tp/pp/dp layout trains from it (`trainer.resume=OUT_DIR`): the trainer loads the
whole model before splitting it and starts a fresh optimizer and LR schedule. Exporting it again gives the
original tensors back bit for bit (in their dtype).

To continue pretraining: preprocess with its tokenizer (`data.tokenizer.path=OUT_DIR/step00000000/tokenizer.json`)
and train with the model settings the import prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from distlm.checkpoint import store
from distlm.checkpoint.store import RunState
from distlm.checkpoint.weights import checked_weights
from distlm.config import CheckpointError, ModelConfig, MoeConfig, RopeScaling
from distlm.files import file_sha256, write_atomic
from distlm.hf.names import from_hf

log = logging.getLogger(__name__)


def model_config(hf: dict) -> ModelConfig:
    """distlm's model settings for a HF Llama or Mixtral config.json; refuses what distlm's Llama does not compute."""
    unsupported = []
    if hf.get("model_type") not in ("llama", "mixtral"):
        unsupported.append(f"model_type {hf.get('model_type')!r} (only 'llama' and 'mixtral')")
    if hf.get("sliding_window"):
        unsupported.append(f"sliding_window {hf['sliding_window']} (attention over the whole context only)")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {hf['hidden_act']!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("attention/MLP biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        unsupported.append(f"RoPE scaling {rope_type!r} (only Llama 3's)")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        unsupported.append(f"head_dim {head_dim} x {n_heads} heads != hidden_size {hf['hidden_size']}")
    if unsupported:
        raise CheckpointError(f"cannot import: distlm's Llama does not support {'; '.join(unsupported)}")
    return ModelConfig(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                 high_freq_factor=rope["high_freq_factor"],
                                 original_max_seq_len=rope["original_max_position_embeddings"])
        if rope_type == "llama3" else None, norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        # Mixtral: every block sparse; it was trained without a z-loss
        moe=MoeConfig(experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      expert_ffn_dim=hf["intermediate_size"], every=1,
                      aux_loss_weight=hf.get("router_aux_loss_coef", 0.0), z_loss_weight=0.0)
        if hf.get("model_type") == "mixtral" else None)


def read_hf_weights(hf_dir: Path, m: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors under distlm names, read one at a time from model.safetensors or its shards."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"cannot import {hf_dir}: no model.safetensors or model.safetensors.index.json "
                              f"(PyTorch .bin weights are not read; convert them with transformers first)")
    weights = {}
    for name in files:
        with safe_open(hf_dir / name, framework="pt") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key)
    return checked_weights(from_hf(m, weights), m, f"cannot import {hf_dir}")


def eos_token(hf_dir: Path, hf: dict, tokenizer: Tokenizer) -> str:
    tok_cfg = hf_dir / "tokenizer_config.json"
    token = json.loads(tok_cfg.read_text()).get("eos_token") if tok_cfg.is_file() else None
    if isinstance(token, dict):  # older files store an AddedToken
        token = token.get("content")
    if token is None and hf.get("eos_token_id") is not None:
        eos_id = hf["eos_token_id"]
        token = tokenizer.id_to_token(eos_id[0] if isinstance(eos_id, list) else eos_id)
    if token is None or tokenizer.token_to_id(token) is None:
        raise CheckpointError(f"cannot import {hf_dir}: no end-of-sequence token found in tokenizer_config.json or "
                              f"config.json that tokenizer.json knows")
    return token


def pad_token(hf_dir: Path, eos: str, tokenizer: Tokenizer) -> str | None:
    """The model's own pad token when it has one other than EOS (the export keeps it; else it adds one)."""
    tok_cfg = hf_dir / "tokenizer_config.json"
    token = json.loads(tok_cfg.read_text()).get("pad_token") if tok_cfg.is_file() else None
    if isinstance(token, dict):
        token = token.get("content")
    return token if token != eos and token is not None and tokenizer.token_to_id(token) is not None else None


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Write `hf_dir` as a distlm checkpoints directory `out_dir` (tag step00000000); return the tag dir."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"cannot import {hf_dir}: no config.json (a local Hugging Face model directory)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another output directory")
    hf = json.loads((hf_dir / "config.json").read_text())
    m = model_config(hf)
    if not (hf_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"cannot import {hf_dir}: no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    eos = eos_token(hf_dir, hf, tokenizer)
    weights = read_hf_weights(hf_dir, m)

    tag = store.tag_for_step(0)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / tag).mkdir(parents=True)
    try:
        # fp32 as training keeps its master weights; bf16/fp16 values convert exactly and back.
        save_file({k: w.float().contiguous() for k, w in weights.items()}, tmp / tag / store.WEIGHTS_FILE)
        shutil.copyfile(hf_dir / "tokenizer.json", tmp / tag / store.TOKENIZER_FILE)  # as is: the same sha256
        config = {"model": asdict(m), "data": {"tokenizer": {"eos_token": eos, "pad_token": pad_token(hf_dir, eos, tokenizer)}}, "imported_from": str(hf_dir.resolve())}
        state = RunState(config=config, tokenizer_sha256=file_sha256(hf_dir / "tokenizer.json"))
        write_atomic(tmp / tag / store.STATE_FILE, json.dumps(asdict(state), indent=1))
        write_atomic(tmp / store.LATEST_FILE, tag)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out_dir, ignore_errors=True)  # empty, checked above
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = sum(w.numel() for w in weights.values())
    overrides = " ".join(f"model.{k}={_override(v)}" for k, v in asdict(m).items() if k not in ("max_seq_len", "init_std"))
    log.info("imported %s -> %s: %.2fM parameters (%s), EOS %r\n  train from it with: distlm train "
             "trainer.resume=%s data.tokenizer.path=%s %s", hf_dir, out_dir / tag, n_params / 1e6,
             next(iter(weights.values())).dtype, eos, out_dir, out_dir / tag / store.TOKENIZER_FILE, overrides)
    return out_dir / tag


def _override(value) -> str:
    """A value as Hydra's override grammar writes it."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    return str(value)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="distlm import-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", type=Path, help="a local Hugging Face Llama directory (config.json, safetensors, "
                                                  "tokenizer.json)")
    parser.add_argument("out_dir", type=Path, help="the distlm checkpoints directory to create")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import_hf(args.hf_dir, args.out_dir)
    except (CheckpointError, FileExistsError) as e:
        log.error("%s", e)
        sys.exit(2)
