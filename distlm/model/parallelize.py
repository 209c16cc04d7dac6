"""How a Llama is split across ranks: the tensor-parallel plan and the pipeline stages.

llama.py knows nothing of this: the plan swaps its linear layers for tensor-parallel ones in place, and
the pipeline split wraps its embedding, blocks and head as DeepSpeed pipeline stages. With document
masking a stage's input and output is the tuple (activations or token ids, document ids, positions): the
document ids and positions travel with the activations from stage to stage. Both keep the
model's parameter names (a stage `3` holding `layers.2....`), so `full_state_dict` can gather a layout
back into the names of a one-process Llama (and of Hugging Face's, less the `model.` prefix).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.checkpoint import constants as uc
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from distlm.model.llama import Llama, rope_and_mask
from distlm.parallel.layout import Layout
from distlm.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy,
                                    VocabParallelEmbedding, copy_to_tp, padded_vocab_size)

PARTITION_METHODS = {"blocks": "type:BlockStage", "parameters": "parameters", "uniform": "uniform"}


def tensor_parallel(model: Llama, layout: Layout) -> Llama:
    """Split attention heads, MLP and vocabulary over the TP group (in place)."""
    tp, rank, group = layout.tp, layout.tp_rank, layout.tp_group
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (ColumnParallelLinear(lin, group, rank, tp)
                                                 for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = RowParallelLinear(attn.o_proj, group, rank, tp)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp  # whole KV groups per rank
        mlp.gate_proj, mlp.up_proj = (ColumnParallelLinear(lin, group, rank, tp) for lin in (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = RowParallelLinear(mlp.down_proj, group, rank, tp)
    vocab = model.cfg.vocab_size
    padded = padded_vocab_size(vocab, tp)
    embed = VocabParallelEmbedding(model.embed_tokens, group, rank, tp, padded)
    head = ColumnParallelLinear(model.lm_head, group, rank, tp, pad_to=padded)
    if model.cfg.tie_embeddings:
        head.weight = embed.weight
    model.embed_tokens, model.lm_head = embed, head
    model.loss_fn = VocabParallelCrossEntropy(group, rank, padded // tp, vocab)
    return model


class EmbedStage(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, ids: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if isinstance(ids, tuple):  # (token ids, document ids, positions)
            return (self.embed_tokens(ids[0]), *ids[1:])
        return self.embed_tokens(ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The output head of tied embeddings, on the last stage."""
        if isinstance(self.embed_tokens, VocabParallelEmbedding):
            x = copy_to_tp(x, self.embed_tokens.group)
        return F.linear(x, self.embed_tokens.weight)


class BlockStage(nn.Module):
    def __init__(self, index: int, block: nn.Module, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleDict({str(index): block})  # keeps the name layers.<index>.*
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
        (block,) = self.layers.values()
        x, *documents = x if isinstance(x, tuple) else (x,)
        cos, sin, mask = rope_and_mask(self.rope_cos, self.rope_sin, x.shape[1], *(documents or (None, None)))
        x = block(x, cos, sin, mask)
        return (x, *documents) if documents else x


class NormStage(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        return self.norm(x[0] if isinstance(x, tuple) else x)


class HeadStage(NormStage):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__(norm)
        self.lm_head = lm_head

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        return self.lm_head(super().forward(x))


def _unembed(stage: EmbedStage, x: torch.Tensor) -> torch.Tensor:
    return stage.unembed(x)


def pipeline_stages(model: Llama, layout: Layout, partition: str, checkpoint_interval: int) -> PipelineModule:
    """The model as a sequence of DeepSpeed pipeline stages: embedding, one stage per block, head."""
    blocks = [LayerSpec(BlockStage, i, block, model.rope_cos, model.rope_sin) for i, block in enumerate(model.layers)]
    if model.cfg.tie_embeddings:
        # One matrix on the first and the last stage: DeepSpeed keeps the copies equal by summing their
        # gradients across the two stages.
        first = TiedLayerSpec("embed", EmbedStage, model.embed_tokens, tied_weight_attr="embed_tokens.weight")
        last = [LayerSpec(NormStage, model.norm),
                TiedLayerSpec("embed", EmbedStage, model.embed_tokens, forward_fn=_unembed,
                              tied_weight_attr="embed_tokens.weight")]
    else:
        first, last = LayerSpec(EmbedStage, model.embed_tokens), [LayerSpec(HeadStage, model.norm, model.lm_head)]
    return PipelineModule(layers=[first, *blocks, *last], topology=layout.topology, loss_fn=model.loss_fn,
                          partition_method=PARTITION_METHODS[partition],
                          activation_checkpoint_interval=checkpoint_interval,
                          # Only blocks: a reentrant checkpoint around the embedding (integer input) would
                          # cut its gradient.
                          checkpointable_layers=["BlockStage"])


_STAGE_PREFIX = re.compile(r"^(\d+\.|tied_modules\.\w+\.)")


def canonical_name(name: str) -> str:
    """A parameter's one-process Llama name, whatever the layout: `3.layers.2.mlp.up_proj.weight` ->
    `layers.2.mlp.up_proj.weight`, `tied_modules.embed.embed_tokens.weight` -> `embed_tokens.weight`."""
    return _STAGE_PREFIX.sub("", name)


def universal_checkpoint_info(vocab_size: int) -> dict:
    """How each parameter is split, for DeepSpeed's universal checkpoints (`ds_to_universal` merges the
    slices of a checkpoint by these rules; loading re-slices them for any other layout). Patterns are
    `re.match`ed against parameter names of any layout (`5.layers.3.self_attn.o_proj.weight`, ...).
    Column-parallel weights (q/k/v, gate/up) are DeepSpeed's default: split along dim 0."""
    return {
        uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [r".*\.(o_proj|down_proj)\.weight$"],
        uc.TP_REPLICATED_PARAMETER_PATTERNS: [r".*norm\.weight$"],
        # Split along the (padded) vocabulary: the merge drops the padding, loading pads for the new tp.
        uc.VOCABULARY_PARAMETER_PATTERNS: [r"(.*\.)?(embed_tokens|lm_head)\.weight$"],
        uc.ORIGINAL_VOCAB_SIZE: vocab_size,
        # Tied embeddings live on the first and the last pipeline stage: one copy is kept.
        uc.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [r"tied_modules\..*"],
    }


def full_state_dict(module: nn.Module, layout: Layout, vocab_size: int) -> dict[str, torch.Tensor]:
    """The whole model's weights under one-process Llama names, on every rank: TP slices concatenated,
    vocabulary padding dropped, pipeline stages merged. Collective; for tests and small models."""
    local = {}
    for name, p in module.named_parameters():
        name = canonical_name(name)
        tensor = p.detach().float().cpu()
        if getattr(p, "tensor_model_parallel", False) and layout.tp > 1:
            pieces = [torch.empty_like(tensor) for _ in range(layout.tp)]
            dist.all_gather(pieces, tensor.contiguous(), group=layout.tp_group)
            tensor = torch.cat(pieces, dim=p.partition_dim)
        local[name] = tensor
    merged: dict[str, torch.Tensor] = {}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for part in gathered:
        merged.update(part)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in merged:
            merged[name] = merged[name][:vocab_size]
    return merged
