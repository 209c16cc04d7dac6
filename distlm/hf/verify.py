"""Check an export against the checkpoint: transformers and distlm's Llama read one fixed sequence, and their
logits must agree.

Neither model is ever whole in memory: both are built on the meta device (no random initialization), and
each module (the embedding, every block, the final norm, the head) receives its weights, with
`load_state_dict(assign=True)`, just before it runs and drops them right after. transformers' own forward
runs unchanged (its masks, RoPE and attention), on the tensors read back from the exported files by the
names transformers gives them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distlm.config import ExportDtype, ModelConfig
from distlm.hf.names import fused_in_memory, to_in_memory
from distlm.model.llama import Llama, rope_cache

log = logging.getLogger(__name__)

TORCH_DTYPE = {ExportDtype.fp32: torch.float32, ExportDtype.bf16: torch.bfloat16, ExportDtype.fp16: torch.float16}

# Largest |Δlogits| verification accepts, as a fraction of max(1, largest |logit|). fp32 must agree to
# rounding; bf16 keeps 8 significant bits and fp16 11, so their rounded weights move the logits further.
LOGIT_TOLERANCE = {ExportDtype.fp32: 1e-4, ExportDtype.bf16: 5e-2, ExportDtype.fp16: 1e-2}
VERIFY_TOKENS = 32  # length of the fixed sequence both models read
INDEX_FILE = "model.safetensors.index.json"


def verify(hf_dir: Path, m: ModelConfig, weights: Callable[[str], torch.Tensor], dtype: ExportDtype,
           release: Callable[[], None] = lambda: None) -> float:
    """Run one fixed sequence through transformers' Llama on the files in `hf_dir` and through distlm's
    Llama on `weights(name)` (fp32, distlm names); log max |Δlogits| and how often the next-token choices
    agree. Raise if the logits are too far apart. `release` is called after each module has run."""
    exported = _ExportedFiles(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPE[dtype]).eval()
        ours = Llama(m).eval()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config)  # its inverse frequencies are computed, not loaded
    ours.rope_cos, ours.rope_sin = rope_cache(m)
    _check_names(hf, exported, hf_dir)
    layers = [f"layers.{i}" for i in range(m.n_layers)]
    _stream_weights(hf, ["model.embed_tokens", *(f"model.{x}" for x in layers), "model.norm", "lm_head"], exported.get,
                    release)
    _stream_weights(ours, ["embed_tokens", *layers, "norm", "lm_head"], weights, release)

    n = min(VERIFY_TOKENS, m.max_seq_len)
    ids = torch.randint(0, m.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(ids)
        got = hf(input_ids=ids).logits.float()[..., :m.vocab_size]   # without a pad row the export appended
    max_diff = (ref - got).abs().max().item()
    tolerance = LOGIT_TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    agree = (ref.argmax(-1) == got.argmax(-1)).sum().item()
    log.info("verify: max |Δlogits| %.3g over %d tokens (tolerance %.3g for %s; largest |logit| %.3g); "
             "the next-token choice agrees at %d of %d positions", max_diff, n, tolerance, dtype.value,
             ref.abs().max().item(), agree, n)
    if (hf_dir / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(hf_dir)
        log.info("verify: next tokens, distlm %r", tok.decode(ref.argmax(-1)[0]))
        log.info("verify: next tokens, HF     %r", tok.decode(got.argmax(-1)[0]))
    if not max_diff <= tolerance:  # also catches NaN
        raise RuntimeError(f"export {hf_dir} does not reproduce the checkpoint: max |Δlogits| {max_diff:.3g} "
                           f"> tolerance {tolerance:.3g} ({dtype.value})")
    return max_diff


class _ExportedFiles:
    """The tensors of an export, read one at a time by the names transformers gives them in memory (Mixtral's
    experts fused from their per-expert matrices in the files); tied embeddings read the embedding for
    `lm_head.weight`, as transformers ties them."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / INDEX_FILE
        if index.is_file():
            self.file_of = {k: hf_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(hf_dir / "model.safetensors", framework="pt") as f:
                self.file_of = {k: hf_dir / "model.safetensors" for k in f.keys()}
        in_files = {}
        for file in set(self.file_of.values()):
            with safe_open(file, framework="pt") as f:
                in_files.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
        config = json.loads((hf_dir / "config.json").read_text())
        self.tied, self.experts = config.get("tie_word_embeddings", False), config.get("num_local_experts", 0)
        self.shapes = {k: tuple(t.shape) for k, t in to_in_memory(in_files, self.experts).items()}

    def get(self, name: str) -> torch.Tensor:
        if self.tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        fused = fused_in_memory(name, self._read, self.experts)
        return self._read(name) if fused is None else fused

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(self.file_of[name], framework="pt") as f:
            return f.get_tensor(name)


def _check_names(hf: nn.Module, exported: _ExportedFiles, hf_dir: Path) -> None:
    """What from_pretrained would report: weights transformers expects but the files lack, the reverse, and
    wrong shapes (transformers only warns and initializes such weights at random)."""
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if exported.tied:
        expected.pop("lm_head.weight", None)
    missing = sorted(expected.keys() - exported.shapes.keys())
    unexpected = sorted(exported.shapes.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & exported.shapes.keys() if expected[k] != exported.shapes[k])
    if missing or unexpected or mismatched:
        raise RuntimeError(f"export {hf_dir} does not load cleanly in transformers: missing {missing}, "
                           f"unexpected {unexpected}, mismatched shapes {mismatched}")


def _stream_weights(model: nn.Module, modules: list[str], read: Callable[[str], torch.Tensor],
                    release: Callable[[], None] = lambda: None) -> None:
    """Give each named submodule of a meta-device `model` its weights (`read(full name)`) when it is about
    to run, and take them back to the meta device when it has run."""
    for prefix in modules:
        module = model.get_submodule(prefix)
        names = list(module.state_dict().keys())

        def load(mod: nn.Module, args, prefix=prefix, names=names) -> None:
            mod.load_state_dict({k: read(f"{prefix}.{k}") for k in names}, assign=True)
            release()  # the files' pages, now that the module has its own copy

        def drop(mod: nn.Module, args, output) -> None:
            mod.to("meta")
            release()

        module.register_forward_pre_hook(load)
        module.register_forward_hook(drop)
