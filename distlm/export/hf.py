"""Export a distlm checkpoint as a Hugging Face `LlamaForCausalLM` directory, checked against distlm's model.

distlm's parameter names and rotate-half RoPE already follow HF's Llama, so the weights only gain the
`model.` prefix. Weights above `export.max_shard_mb` are split over several safetensors files with an index,
as transformers does, and cast to the export's dtype one file at a time. The export is written into a hidden
sibling directory, verified there, and renamed into place last: a crash or a failed check never leaves a
half-written directory that looks like an export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerFast)

from distlm.config import Config, ConfigError, ExportDtype, ModelConfig
from distlm.model.llama import Llama
from distlm.train import checkpoint, universal
from distlm.train.checkpoint import CheckpointError, RunState

log = logging.getLogger(__name__)

TORCH_DTYPE = {ExportDtype.fp32: torch.float32, ExportDtype.bf16: torch.bfloat16, ExportDtype.fp16: torch.float16}

# Largest |Δlogits| verification accepts, as a fraction of max(1, largest |logit|). fp32 must agree to
# rounding; bf16 keeps 8 significant bits and fp16 11, so their rounded weights move the logits further.
LOGIT_TOLERANCE = {ExportDtype.fp32: 1e-4, ExportDtype.bf16: 5e-2, ExportDtype.fp16: 1e-2}
VERIFY_TOKENS = 32  # length of the fixed sequence both models read
GREEDY_TOKENS = 8  # greedy continuation logged for both models
SHARD_INDEX_FILE = "model.safetensors.index.json"  # transformers' name


def export(c: Config) -> Path:
    """Write the checkpoint at `c.export.checkpoint_dir` (tag `c.export.tag`, or the latest complete one)
    as a HF Llama directory at `c.export.out_dir`; return that directory."""
    out_dir = Path(c.export.out_dir)
    if not c.export.max_shard_mb > 0:
        raise ConfigError(f"export.max_shard_mb={c.export.max_shard_mb} must be positive")
    _check_replaceable(out_dir)
    tag_dir = locate_checkpoint(Path(c.export.checkpoint_dir), c.export.tag)
    state = checkpoint.read_state(tag_dir)
    model_cfg = ModelConfig(**state.config["model"])
    eos_token = state.config["data"]["tokenizer"]["eos_token"]
    dtype = TORCH_DTYPE[c.export.dtype]
    weights = read_weights(tag_dir, state, model_cfg)

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        eos_id = _write_tokenizer(tag_dir, eos_token, model_cfg, tmp_dir)
        _write_model(weights, model_cfg, eos_id, dtype, tmp_dir, c.export.max_shard_mb)
        max_diff = verify(tmp_dir, model_cfg, weights, c.export.dtype) if c.export.verify else None
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    _log_summary(tag_dir, state, weights, model_cfg, c.export.dtype, out_dir, max_diff)
    return out_dir


def locate_checkpoint(root: Path, tag: str | None) -> Path:
    """The tag directory to export: `root/tag`, `root` itself if it is a tag directory, or else the latest
    complete tag under `root`."""
    if tag is not None:
        tag_dir = root / tag
        if not tag_dir.is_dir():
            raise CheckpointError(f"no checkpoint {tag_dir} (complete tags in {root}: {checkpoint.complete_tags(root)})")
        return tag_dir
    if any(root.glob("*model_states.pt")):  # a tag directory, named directly (complete or not)
        return root
    ckpt_dir, tag = checkpoint.resolve(root)
    return ckpt_dir / tag


def read_weights(tag_dir: Path, state: RunState, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The fp32 weights of the checkpoint under distlm's parameter names, checked against the model's shapes."""
    imported = checkpoint.is_weights_only(tag_dir)  # by `distlm import-hf`: no layout
    zero_stage, tp, pp = (0, 1, 1) if imported else (state.config["parallel"][k] for k in ("zero_stage", "tp", "pp"))
    for f in sorted([*tag_dir.glob("*_model_states.pt"), *tag_dir.glob("*_optim_states.pt")]):
        # torch.save writes zip archives: a truncated or overwritten file lacks the zip's central directory.
        if not zipfile.is_zipfile(f):
            raise CheckpointError(f"checkpoint {tag_dir}: {f.name} is damaged (not a complete torch file)")
    try:
        if imported:
            weights = checkpoint.load_weights(tag_dir)
        elif tp > 1 or pp > 1:
            # TP slices and pipeline stages are merged, and the vocabulary padding dropped, by the
            # checkpoint's universal form (made once, kept in the checkpoint).
            weights = universal.read_weights(universal.convert(tag_dir))
        elif zero_stage >= 1:
            # ZeRO shards the fp32 master weights over the ranks' optimizer files; DeepSpeed's own
            # consolidation reads stages 1-3 and needs no process group.
            weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        else:
            # Without ZeRO every rank holds the whole model; rank 0's file has it. The file also holds
            # DeepSpeed's own objects, hence weights_only=False: it is the run's own checkpoint.
            states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            weights = {k: v.float() for k, v in states["module"].items()}
    except Exception as e:  # torch.load and DeepSpeed fail in many ways on missing or damaged shards
        raise CheckpointError(
            f"checkpoint {tag_dir}: cannot read the ZeRO-{zero_stage} weights: {type(e).__name__}: {e}") from e

    weights = checked_weights(weights, model_cfg, f"checkpoint {tag_dir}")
    if model_cfg.tie_embeddings:  # one matrix serves both
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return weights


def checked_weights(weights: dict[str, torch.Tensor], m: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """`weights` in the order of Llama(m)'s parameters; a CheckpointError naming `where` unless they have
    exactly its names and shapes. With tied embeddings only `embed_tokens.weight` is kept (a stored second
    copy as `lm_head.weight` is dropped)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Llama(m).state_dict().items()}
    if m.tie_embeddings:
        expected.pop("lm_head.weight")
        weights = {k: w for k, w in weights.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k])})"
             for k in expected.keys() & weights.keys() if weights[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: the weights do not match the model config: missing {missing}, "
                              f"unexpected {unexpected}, wrong shape {wrong}")
    return {k: weights[k] for k in expected}


def hf_config(m: ModelConfig, eos_id: int, dtype: torch.dtype) -> LlamaConfig:
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=m.init_std,
        tie_word_embeddings=m.tie_embeddings,
        # Documents are separated by EOS only, so EOS also serves as BOS and padding (as in GPT-2).
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=dtype,
    )


def to_hf_names(weights: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """distlm names -> HF names (`model.` prefix), the same tensors (no copy); tied embeddings store one matrix."""
    return {name if name == "lm_head.weight" else "model." + name: w for name, w in weights.items()
            if not (tie_embeddings and name == "lm_head.weight")}


def plan_shards(nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_shard_bytes`, in order; a tensor larger than that
    gets a file of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in nbytes.items():
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_tokenizer(tag_dir: Path, eos_token: str, m: ModelConfig, out_dir: Path) -> int:
    tok_file = tag_dir / checkpoint.TOKENIZER_FILE
    try:
        raw = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise CheckpointError(f"checkpoint {tag_dir}: cannot read {tok_file.name}: {e}") from e
    eos_id = raw.token_to_id(eos_token)
    if eos_id is None:
        raise CheckpointError(f"checkpoint {tag_dir}: EOS token {eos_token!r} is not in {tok_file.name}")
    if raw.get_vocab_size() > m.vocab_size:
        raise CheckpointError(f"checkpoint {tag_dir}: {tok_file.name} has {raw.get_vocab_size()} tokens but the "
                              f"model only {m.vocab_size} embeddings")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_token, bos_token=eos_token,
                                  pad_token=eos_token, model_max_length=m.max_seq_len)
    tok.save_pretrained(out_dir)
    return eos_id


def _write_model(weights: dict[str, torch.Tensor], m: ModelConfig, eos_id: int, dtype: torch.dtype,
                 out_dir: Path, max_shard_mb: float) -> None:
    """config.json, generation_config.json and the weights: `model.safetensors`, or, above `max_shard_mb`,
    `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json` as transformers writes them."""
    hf_config(m, eos_id, dtype).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)
    tensors = to_hf_names(weights, m.tie_embeddings)
    nbytes = {k: w.numel() * dtype.itemsize for k, w in tensors.items()}
    shards = plan_shards(nbytes, int(max_shard_mb * 1e6))  # MB as in HF's "5GB": powers of ten
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    mode = (out_dir / "config.json").stat().st_mode
    for file, names in zip(files, shards):
        # Cast one file's tensors at a time: at most one shard of converted weights beside the checkpoint's.
        # Own storage for each: safetensors refuses tensors that share memory (ZeRO's flat buffers).
        shard = {k: tensors[k].detach().to(dtype=dtype, copy=True).contiguous() for k in names}
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        del shard
        # safetensors 0.8 creates the file 0600 (a private temp file); give it the umask's mode like the others.
        os.chmod(out_dir / file, mode)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(w.numel() for w in tensors.values()),
                              "total_size": sum(nbytes.values())},
                 "weight_map": {k: file for file, names in zip(files, shards) for k in names}}
        (out_dir / SHARD_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def verify(hf_dir: Path, m: ModelConfig, weights: dict[str, torch.Tensor], dtype: ExportDtype) -> float:
    """Load `hf_dir` with transformers, run one fixed sequence through it and through distlm's Llama with the
    checkpoint's fp32 weights; log max |Δlogits| and both greedy continuations. Raise if too far apart."""
    hf, loading = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=TORCH_DTYPE[dtype], output_loading_info=True)
    hf.eval()
    # transformers only warns about weights it cannot find (and initializes them at random): fail here.
    problems = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise RuntimeError(f"export {hf_dir} does not load cleanly in transformers: {problems}")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ours = Llama(m).eval()
    ours.load_state_dict(weights)

    n = min(VERIFY_TOKENS, m.max_seq_len - GREEDY_TOKENS)
    ids = torch.randint(0, m.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(ids)
        got = hf(input_ids=ids).logits.float()
        ours_next = _greedy(ours, ids, GREEDY_TOKENS)
        hf_next = _greedy(lambda x: hf(input_ids=x).logits, ids, GREEDY_TOKENS)
    max_diff = (ref - got).abs().max().item()
    tolerance = LOGIT_TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    log.info("verify: max |Δlogits| %.3g over %d tokens (tolerance %.3g for %s; largest |logit| %.3g)",
             max_diff, n, tolerance, dtype.value, ref.abs().max().item())
    log.info("verify: greedy distlm %s %r", ours_next, tok.decode(ours_next))
    log.info("verify: greedy HF     %s %r", hf_next, tok.decode(hf_next))
    if not max_diff <= tolerance:  # also catches NaN
        raise RuntimeError(f"export {hf_dir} does not reproduce the checkpoint: max |Δlogits| {max_diff:.3g} "
                           f"> tolerance {tolerance:.3g} ({dtype.value})")
    return max_diff


def _greedy(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, n: int) -> list[int]:
    new = []
    for _ in range(n):
        next_id = logits_fn(ids)[0, -1].argmax().item()
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor an earlier export."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"export.out_dir {out_dir} exists and is not a Hugging Face model directory; "
                              f"choose another export.out_dir or remove it")


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an earlier export there is swapped out first, then deleted."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _log_summary(tag_dir: Path, state: RunState, weights: dict[str, torch.Tensor], m: ModelConfig,
                 dtype: ExportDtype, out_dir: Path, max_diff: float | None) -> None:
    n_params = sum(w.numel() for k, w in weights.items() if not (m.tie_embeddings and k == "lm_head.weight"))
    files = ", ".join(f"{p.name} ({_size(p.stat().st_size)})" for p in sorted(out_dir.iterdir()))
    check = f"max |Δlogits| {max_diff:.3g}" if max_diff is not None else "not verified (export.verify=false)"
    log.info("exported %s (step %d, %d tokens seen) -> %s\n  %.2fM params, %s, %s\n  files: %s", tag_dir,
             state.step, state.tokens_seen, out_dir, n_params / 1e6, dtype.value, check, files)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"
