"""Fill a rank's part of the model without ever holding the whole model.

The model is built on the meta device (shapes, no storage) and split for the layout there
(distlm/model/parallelize.py); then each parameter gets storage for this rank's slice only and is filled
from a weight source, one tensor slice at a time:
- `InitialWeights`: the initial weights, drawn by llama.py's `initial_std`. Each block of rows of each
  tensor has its own random stream, seeded by (seed, one-process parameter name, block), so a rank draws
  only the rows it keeps (a column slice still draws its rows, one block at a time) and every layout gets
  the same numbers as one process.
- `SafetensorsWeights`: a weights file under one-process names (an imported Hugging Face model), read
  slice by slice with safetensors' `get_slice`.
Under ZeRO-3 each module's parameters are partitioned by `deepspeed.zero.Init` as soon as they have storage,
and only this rank's partition is filled, so the peak is one module's full parameters, not the model.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open

from distlm.config import ModelConfig
from distlm.memory import return_freed_memory
from distlm.model.llama import Llama, initial_std, rope_cache
from distlm.parallel.layout import Layout

BLOCK_ELEMENTS = 1 << 20  # rows are drawn in blocks of about this many elements, each from its own stream
_STAGE_PREFIX = re.compile(r"^(\d+\.|tied_modules\.\w+\.)")


def canonical_name(name: str) -> str:
    """A parameter's one-process Llama name, whatever the layout: `3.layers.2.mlp.up_proj.weight` ->
    `layers.2.mlp.up_proj.weight`, `tied_modules.embed.embed_tokens.weight` -> `embed_tokens.weight`."""
    return _STAGE_PREFIX.sub("", name)


def full_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's shape in a one-process Llama (built on the meta device: no storage, no init); tied
    embeddings are one matrix, `embed_tokens.weight`."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Llama(cfg).named_parameters()}


def check_shapes(found: dict[str, tuple], cfg: ModelConfig, where: str) -> dict[str, torch.Size]:
    """full_shapes(cfg), in Llama's order; a ValueError naming `where` unless `found` (name -> shape) has exactly
    those names and shapes. A stored second copy of tied embeddings (`lm_head.weight`) is ignored."""
    expected = full_shapes(cfg)
    if cfg.tie_embeddings:
        found = {k: s for k, s in found.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = [f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in expected.keys() & found.keys()
             if tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: the weights do not match the model config: missing {missing}, unexpected "
                         f"{unexpected}, wrong shape {wrong}")
    return expected


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class InitialWeights:
    """The initial weights: rows [start, stop), columns `cols` of any full tensor, drawn on their own."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def rows(self, name: str, shape: torch.Size, start: int, stop: int, cols: slice) -> torch.Tensor:
        std = initial_std(name, self.cfg)
        if std is None:
            return torch.ones(stop - start, *shape[1:])[:, cols] if len(shape) > 1 else torch.ones(stop - start)
        row_numel = shape[1:].numel()
        per_block = max(1, BLOCK_ELEMENTS // row_numel)
        out = []
        for block in range(start // per_block, -(-stop // per_block)):
            first, last = block * per_block, min((block + 1) * per_block, shape[0])
            generator = torch.Generator().manual_seed(_block_seed(self.seed, name, block))
            drawn = torch.empty(last - first, *shape[1:]).normal_(0.0, std, generator=generator)
            drawn = drawn[max(first, start) - first:min(last, stop) - first]
            out.append(drawn[:, cols] if len(shape) > 1 else drawn)
        return torch.cat(out)


class SafetensorsWeights:
    """Weights under one-process names in a safetensors file, read by slice. Names and shapes are checked
    against the model config before anything is read."""

    def __init__(self, path: Path, cfg: ModelConfig):
        self.path, self.file = Path(path), safe_open(str(path), framework="pt")
        found = {k: tuple(self.file.get_slice(k).get_shape()) for k in self.file.keys()}
        try:
            check_shapes(found, cfg, str(path))
        except ValueError as e:
            raise ValueError(f"{e}; import the model again with its own config") from None

    def rows(self, name: str, shape: torch.Size, start: int, stop: int, cols: slice) -> torch.Tensor:
        piece = self.file.get_slice(name)
        return piece[start:stop, cols] if len(shape) > 1 else piece[start:stop]


def _values(source, name: str, full: torch.Size, p: nn.Parameter, layout: Layout, first: int,
            last: int) -> torch.Tensor:
    """Elements [first, last) of this rank's (flattened) tensor-parallel slice of parameter `name`. Rows past
    the real vocabulary (the padding of a vocabulary split over TP ranks) are zeros."""
    local = getattr(p, "ds_shape", p.shape)
    row_numel = local[1:].numel()
    row_start, row_stop = first // row_numel, -(-last // row_numel)
    offset, cols = 0, slice(None)
    if getattr(p, "tensor_model_parallel", False) and layout.tp > 1:
        if p.partition_dim == 0:
            offset = layout.tp_rank * local[0]
        else:
            cols = slice(layout.tp_rank * local[1], (layout.tp_rank + 1) * local[1])
    rows = torch.zeros(row_stop - row_start, *local[1:], dtype=p.dtype)
    real_stop = min(offset + row_stop, full[0])
    if offset + row_start < real_stop:
        got = source.rows(name, full, offset + row_start, real_stop, cols)
        rows[:real_stop - offset - row_start] = got.to(rows.dtype).reshape(-1, *local[1:])
    return rows.view(-1)[first - row_start * row_numel:last - row_start * row_numel]


def _allocate_own(mod: nn.Module, replaced: dict[int, tuple[nn.Parameter, nn.Parameter]],
                  dtype: torch.dtype | None = None) -> list[tuple]:
    """Uninitialized CPU storage (of `dtype`, else the meta parameter's) for `mod`'s own meta parameters, keeping
    their attributes (the TP marks); returns the new (meta, real) pairs. `replaced` (meta id -> (meta, real))
    gives a parameter that two modules share (tied) one storage."""
    new = []
    for attr, p in list(mod._parameters.items()):
        if p is not None and p.is_meta:
            if id(p) not in replaced:
                real = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype), requires_grad=p.requires_grad)
                real.__dict__.update(p.__dict__)
                replaced[id(p)] = (p, real)
                new.append((p, real))
            mod._parameters[attr] = replaced[id(p)][1]
    return new


def allocate(module: nn.Module) -> None:
    """Give every meta parameter of `module` uninitialized CPU storage, in place (pipeline stages: DeepSpeed's
    PipelineModule moves its stages to the device, which a meta tensor cannot do; materialize fills them)."""
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for mod in module.modules():
        _allocate_own(mod, replaced)


def materialize(module: nn.Module, cfg: ModelConfig, layout: Layout, source, zero3_config: dict | None = None) -> None:
    """Give this rank's parameters of `module` storage and fill them from `source` (in place), module by
    module. `zero3_config`: a DeepSpeed config with ZeRO-3; each module is partitioned as it gets storage and
    only this rank's partition is filled."""
    shapes = full_shapes(cfg)
    names = {id(p): canonical_name(n) for n, p in module.named_parameters()}
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    filled: set[int] = set()
    # DeepSpeed casts a module to bf16 itself, except a ZeRO-3 one (zero.Init(module=) keeps the dtype it is
    # given): its partitions are made in the training dtype here, as DeepSpeed's own zero.Init context would.
    dtype = torch.bfloat16 if zero3_config is not None and zero3_config["bf16"]["enabled"] else None
    for mod in reversed(list(module.modules())):  # children first: zero.Init(module=) also walks the children
        for meta, real in _allocate_own(mod, replaced, dtype):
            names[id(real)] = names[id(meta)]
        fresh = [p for p in mod._parameters.values() if p is not None and id(p) not in filled]
        if not fresh:
            continue
        if zero3_config is not None:
            deepspeed.zero.Init(module=mod, config_dict_or_path=zero3_config, mpu=layout.grid,
                                data_parallel_group=layout.grid.get_data_parallel_group() if layout.tp > 1 else None)
        for p in fresh:
            filled.add(id(p))
            name = names[id(p)]
            with torch.no_grad():
                if zero3_config is not None:  # this rank's flat partition: elements [rank * size, (rank + 1) * size)
                    size = p.ds_tensor.ds_numel
                    first = dist.get_rank(group=p.ds_process_group) * size
                    last = min(first + size, p.ds_numel)
                    if first < last:
                        p.ds_tensor[:last - first].copy_(_values(source, name, shapes[name], p, layout, first, last))
                else:
                    p.view(-1).copy_(_values(source, name, shapes[name], p, layout, 0, p.numel()))
        if zero3_config is not None:  # the module's full tensors were freed: the rank keeps only its partitions
            return_freed_memory()  # what partitioning freed stays in the heap otherwise (distlm/memory.py)
    if isinstance(module, Llama):  # its RoPE tables were built on the meta device too
        module.rope_cos, module.rope_sin = rope_cache(cfg)
