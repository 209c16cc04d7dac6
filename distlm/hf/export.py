"""Export a distlm checkpoint as a Hugging Face `LlamaForCausalLM` directory (`MixtralForCausalLM` with sparse
blocks), checked against distlm's model.

distlm's parameter names and rotate-half RoPE already follow HF's Llama, so dense weights only gain the
`model.` prefix; experts are cut into Mixtral's per-expert matrices (names.py). The weights stream from the checkpoint to the output files one tensor at a time (read,
cast to the export's dtype, appended to its safetensors file), so the export holds a few tensors, not the
model; above `export.max_shard_mb` they are split over several files with an index, as transformers does.
The export is written into a hidden sibling directory, verified there (`verify.py`, layer by layer as well),
and renamed into place last: a crash or a failed check never leaves a half-written directory that looks
like an export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaConfig, MixtralConfig, PretrainedConfig, PreTrainedTokenizerFast

from distlm.checkpoint import store
from distlm.checkpoint.store import RunState
from distlm.checkpoint.weights import CheckpointWeights, find_checkpoint
from distlm.config import CheckpointError, Config, ExportDtype, ModelConfig, raise_if
from distlm.hf.names import expert_part, hf_tensors
from distlm.hf.verify import TORCH_DTYPE, verify
from distlm.validation import validate_export

log = logging.getLogger(__name__)

SHARD_INDEX_FILE = "model.safetensors.index.json"  # transformers' name
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
PAD_TOKEN = "<|pad|>"   # added at export when preprocessing reserved no data.tokenizer.pad_token
VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")   # distlm names of the [vocab, dim] matrices


def export(c: Config) -> Path:
    """Write the checkpoint at `c.export.checkpoint_dir` (tag `c.export.tag`, or the latest complete one)
    as a HF Llama directory at `c.export.out_dir`; return that directory."""
    raise_if(validate_export(c))
    out_dir = Path(c.export.out_dir)
    _check_replaceable(out_dir)
    tag_dir = find_checkpoint(Path(c.export.checkpoint_dir), c.export.tag)
    state = store.read_state(tag_dir)
    model_cfg = ModelConfig.from_dict(state.config["model"])
    if model_cfg.moe and model_cfg.moe.every != 1:
        raise CheckpointError(f"checkpoint {tag_dir}: model.moe.every={model_cfg.moe.every} mixes dense and sparse "
                              f"blocks, which Mixtral (the export's format) cannot hold; only every=1 exports")
    tokens = state.config["data"]["tokenizer"]
    dtype = TORCH_DTYPE[c.export.dtype]

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        with CheckpointWeights(tag_dir, state, model_cfg) as weights:
            ids = _write_tokenizer(tag_dir, tokens, model_cfg, tmp_dir)
            _write_model(weights, model_cfg, ids, dtype, tmp_dir, c.export.max_shard_mb)
            max_diff = verify(tmp_dir, model_cfg, weights.get, c.export.dtype, weights.release) \
                if c.export.verify else None
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    _log_summary(tag_dir, state, weights, c.export.dtype, out_dir, max_diff)
    return out_dir


def export_memory_bytes(m: ModelConfig, max_shard_mb: float) -> int:
    """Host memory an export of model `m` needs: the process (Python, torch, transformers; 3 GiB), one output
    file, and the largest module four times over (its fp32 tensors, their converted copies, the checkpoint
    pages they came from, and the exported copy verification reads)."""
    mlp = 3 * m.dim * (m.moe.experts * m.moe.expert_ffn_dim if m.moe else m.ffn_dim)
    block = 2 * m.dim * m.n_heads * m.head_dim + 2 * m.dim * m.n_kv_heads * m.head_dim + mlp
    largest = max(block, m.vocab_size * m.dim) * 4
    return 3 * 2**30 + int(max_shard_mb * 1e6) + 4 * largest


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    vocab_size: int   # the export's embedding rows: the model's, plus one when the pad token needed a new row


def hf_config(m: ModelConfig, ids: SpecialIds, dtype: torch.dtype) -> PretrainedConfig:
    """transformers' config of the model: a LlamaConfig, or a MixtralConfig with sparse blocks."""
    common = dict(
        vocab_size=ids.vocab_size,
        hidden_size=m.dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_parameters=rope_parameters(m),
        hidden_act="silu",
        initializer_range=m.init_std,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        dtype=dtype,
    )
    if m.moe:
        return MixtralConfig(architectures=["MixtralForCausalLM"], intermediate_size=m.moe.expert_ffn_dim,
                             num_local_experts=m.moe.experts, num_experts_per_tok=m.moe.top_k,
                             router_aux_loss_coef=m.moe.aux_loss_weight, **common)
    return LlamaConfig(architectures=["LlamaForCausalLM"], intermediate_size=m.ffn_dim, attention_bias=False,
                       mlp_bias=False, **common)


def hf_reader(m: ModelConfig, tensors: dict[str, tuple[str, int | None]], get: Callable[[str], torch.Tensor],
              extra_rows: int = 0):
    """HF name -> its tensor, from distlm's `get(name)`. The vocabulary matrices gain `extra_rows` rows (a pad token
    on a new row) holding the mean of the rows, as transformers' resize_token_embeddings does: its logit stays
    ordinary, and padded positions are masked anyway. The last expert tensor read is kept, so an expert's matrices
    cost one read of their block's tensor, not one per expert."""
    last: dict[str, torch.Tensor] = {}

    def read(hf: str) -> torch.Tensor:
        name, expert = tensors[hf]
        if expert is None:
            t = get(name)
            if extra_rows and name in VOCAB_ROWS:
                t = torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(extra_rows, -1)])
            return t
        if name not in last:
            last.clear()
            last[name] = get(name)
        return expert_part(name, last[name], expert, m.moe.expert_ffn_dim)

    return read


def hf_shape(m: ModelConfig, name: str, expert: int | None, shape: torch.Size, vocab_size: int) -> torch.Size:
    """The shape hf_reader gives distlm tensor `name` of `shape` (an expert's part of it, or `vocab_size` rows)."""
    if expert is not None:
        return expert_part(name, torch.empty(shape, device="meta"), expert, m.moe.expert_ffn_dim).shape
    return torch.Size([vocab_size, *shape[1:]]) if name in VOCAB_ROWS else shape


def add_v4_keys(config_file: Path) -> None:
    """Also write the keys transformers 4.x reads where 5.x renamed them (5.x reads both): `torch_dtype` beside
    `dtype`, and `rope_theta` + `rope_scaling` (None, or the scaling without rope_theta) beside `rope_parameters`."""
    config = json.loads(config_file.read_text())
    rope = dict(config["rope_parameters"])
    config["torch_dtype"] = config["dtype"]
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rope_parameters(m: ModelConfig) -> dict:
    """transformers' rope_parameters for the model's RoPE (Llama 3 scaling as rope_type 'llama3')."""
    s = m.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    return {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}


def _write_tokenizer(tag_dir: Path, tokens: dict, m: ModelConfig, out_dir: Path) -> SpecialIds:
    """tokenizer.json and a tokenizer_config.json that transformers 4.x and 5.x both load
    (`PreTrainedTokenizerFast`, not 5.x's `TokenizersBackend`). BOS is data.tokenizer.bos_token, else EOS (documents
    are separated by EOS only). The pad token differs from EOS, or collators that mask padding in the labels
    (DataCollatorForLanguageModeling) would mask every EOS and a fine-tuned model would never learn to stop: it is
    data.tokenizer.pad_token when preprocessing reserved one, else PAD_TOKEN, added on the first embedding row the
    tokenizer does not use, or on one new row (_write_model appends it)."""
    tok_file = tag_dir / store.TOKENIZER_FILE
    try:
        raw = Tokenizer.from_file(str(tok_file))
    except Exception as e:
        raise CheckpointError(f"checkpoint {tag_dir}: cannot read {tok_file.name}: {e}") from e
    named = {"eos": tokens["eos_token"], "bos": tokens.get("bos_token") or tokens["eos_token"],
             "pad": tokens.get("pad_token") or PAD_TOKEN}
    if named["pad"] == PAD_TOKEN and raw.token_to_id(PAD_TOKEN) is None:
        raw.add_special_tokens([PAD_TOKEN])
    found = {k: raw.token_to_id(t) for k, t in named.items()}
    for k, i in found.items():
        if i is None:
            raise CheckpointError(f"checkpoint {tag_dir}: {k.upper()} token {named[k]!r} is not in {tok_file.name}")
    if raw.get_vocab_size() > m.vocab_size + (named["pad"] == PAD_TOKEN):
        raise CheckpointError(f"checkpoint {tag_dir}: {tok_file.name} has {raw.get_vocab_size()} tokens but the "
                              f"model only {m.vocab_size} embeddings")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=named["eos"], bos_token=named["bos"],
                                  pad_token=named["pad"], model_max_length=m.max_seq_len)
    tok.save_pretrained(out_dir)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"   # 5.x writes TokenizersBackend, unknown to 4.x
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return SpecialIds(bos=found["bos"], eos=found["eos"], pad=found["pad"], vocab_size=max(m.vocab_size, found["pad"] + 1))


def _write_model(weights: CheckpointWeights, m: ModelConfig, ids: SpecialIds, dtype: torch.dtype,
                 out_dir: Path, max_shard_mb: float) -> None:
    """config.json, generation_config.json and the weights: `model.safetensors`, or, above `max_shard_mb`,
    `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json` as transformers writes them."""
    hf_config(m, ids, dtype).save_pretrained(out_dir)
    add_v4_keys(out_dir / "config.json")
    GenerationConfig(bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad).save_pretrained(out_dir)
    tensors = hf_tensors(m, weights.shapes)  # tied embeddings: one matrix, no lm_head.weight
    read = hf_reader(m, tensors, weights.get, ids.vocab_size - m.vocab_size)
    shapes = {hf: hf_shape(m, k, e, weights.shapes[k], ids.vocab_size) for hf, (k, e) in tensors.items()}
    # huggingface_hub plans the files and the index as transformers does; meta tensors give it sizes, no data.
    split = split_torch_state_dict_into_shards({hf: torch.empty(s, dtype=dtype, device="meta")
                                                for hf, s in shapes.items()},
                                               max_shard_size=int(max_shard_mb * 1e6))  # MB as HF's "5GB": powers of 10
    for file, names_in_file in split.filename_to_tensors.items():
        write_safetensors(out_dir / file, {k: shapes[k] for k in names_in_file}, dtype, lambda hf: read(hf).to(dtype))
        weights.release()  # the checkpoint pages this file read leave memory
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(s.numel() for s in shapes.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out_dir / SHARD_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: Path, shapes: dict[str, torch.Size], dtype: torch.dtype,
                      tensor: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file of the named tensors, asked for and written one at a time. Written by hand because
    safetensors' `save_file` takes all of a file's tensors at once and copies them into one buffer."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = shape.numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format's alignment of the data that follows
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, shape in shapes.items():
            t = tensor(name)
            if t.shape != shape or t.dtype != dtype:
                raise CheckpointError(f"{name}: read {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as the format
            del t


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


def _log_summary(tag_dir: Path, state: RunState, weights: CheckpointWeights, dtype: ExportDtype, out_dir: Path,
                 max_diff: float | None) -> None:
    n_params = sum(s.numel() for s in weights.shapes.values())
    files = ", ".join(f"{p.name} ({_size(p.stat().st_size)})" for p in sorted(out_dir.iterdir()))
    check = f"max |Δlogits| {max_diff:.3g}" if max_diff is not None else "not verified (export.verify=false)"
    log.info("exported %s (step %d, %d tokens seen; read from its %s) -> %s\n  %.2fM params, %s, %s\n  files: %s",
             tag_dir, state.step, state.tokens_seen, weights.source, out_dir, n_params / 1e6, dtype.value, check, files)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"
