"""Where each distlm tensor lives in a Hugging Face directory, one home for export, import and verification.

Dense blocks follow HF's Llama names: only the `model.` prefix differs. Sparse blocks (model.moe) are Mixtral's:
the router is `block_sparse_moe.gate`, and each expert e is three matrices `block_sparse_moe.experts.e.w1/w3`
(gate and up, rows e * ffn ... of distlm's gate_proj and up_proj) and `w2` (down, columns of distlm's down_proj).
That is the file format transformers 4 and 5 both read (5 fuses the experts in memory when it loads them, and
saves them back in this form).
"""

from __future__ import annotations

import re

import torch

from distlm.config import ModelConfig

_EXPERT_MATRIX = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's name of each expert matrix
_SPARSE = re.compile(r"layers\.(\d+)\.mlp\.(gate\.weight|experts\.(gate_proj|up_proj|down_proj))")
_HF_SPARSE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w1|w2|w3)\.weight)")


def to_hf_name(name: str) -> str:
    """A dense tensor's HF name (the `model.` prefix)."""
    return name if name == "lm_head.weight" else "model." + name


def hf_tensors(m: ModelConfig, names) -> dict[str, tuple[str, int | None]]:
    """HF name -> (distlm name, expert): a whole distlm tensor (expert None), or expert e's part of one."""
    out: dict[str, tuple[str, int | None]] = {}
    for name in names:
        sparse = _SPARSE.fullmatch(name)
        if sparse is None:
            out[to_hf_name(name)] = (name, None)
        elif sparse[3] is None:
            out[f"model.layers.{sparse[1]}.block_sparse_moe.gate.weight"] = (name, None)
        else:
            for e in range(m.moe.experts):
                matrix = _EXPERT_MATRIX[sparse[3]]
                out[f"model.layers.{sparse[1]}.block_sparse_moe.experts.{e}.{matrix}.weight"] = (name, e)
    return out


def expert_part(name: str, tensor: torch.Tensor, expert: int, ffn: int) -> torch.Tensor:
    """Expert `expert`'s matrix of a sparse block's `tensor` (distlm `name`): rows, or columns of down_proj."""
    units = slice(expert * ffn, (expert + 1) * ffn)
    return tensor[:, units] if name.endswith("down_proj") else tensor[units]


def from_hf(m: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """distlm tensors from a HF state dict (file names): experts concatenated back, in expert order."""
    out, experts = {}, {}
    for key, tensor in hf.items():
        sparse = _HF_SPARSE.fullmatch(key)
        if sparse is None:
            out[key.removeprefix("model.")] = tensor
        elif sparse[3] is None:
            out[f"layers.{sparse[1]}.mlp.gate.weight"] = tensor
        else:
            experts[(int(sparse[1]), sparse[4], int(sparse[3]))] = tensor
    for (layer, matrix, e) in sorted(experts):
        if e == 0:
            name = next(n for n, w in _EXPERT_MATRIX.items() if w == matrix)
            parts = [experts.get((layer, matrix, i)) for i in range(m.moe.experts)]
            if any(p is None for p in parts):
                continue  # missing experts: the shape check names the tensor
            out[f"layers.{layer}.mlp.experts.{name}"] = torch.cat(parts, dim=1 if name == "down_proj" else 0)
    return out


def fused_in_memory(name: str, read, experts: int) -> torch.Tensor | None:
    """transformers 5's in-memory Mixtral tensors (the router `mlp.gate.weight`, experts fused as
    `mlp.experts.gate_up_proj` [experts, 2 ffn, dim] and `mlp.experts.down_proj` [experts, dim, ffn]) from the
    files' tensors (`read(file name)`); None for any other name."""
    fused = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)", name)
    if fused is None:
        return None
    prefix = f"{fused[1]}.block_sparse_moe"
    if fused[2] == "gate.weight":
        return read(f"{prefix}.gate.weight")
    if fused[2] == "experts.down_proj":
        return torch.stack([read(f"{prefix}.experts.{e}.w2.weight") for e in range(experts)])
    return torch.stack([torch.cat([read(f"{prefix}.experts.{e}.w1.weight"), read(f"{prefix}.experts.{e}.w3.weight")])
                        for e in range(experts)])


def to_in_memory(files: dict[str, torch.Tensor], experts: int) -> dict[str, torch.Tensor]:
    """A HF state dict under file names -> under transformers 5's in-memory names (`load_state_dict`)."""
    out = {k: v for k, v in files.items() if not _HF_SPARSE.fullmatch(k)}
    for layer in sorted({int(m[1]) for k in files if (m := _HF_SPARSE.fullmatch(k))}):
        for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            key = f"model.layers.{layer}.mlp.{name}"
            out[key] = fused_in_memory(key, files.__getitem__, experts)
    return out
