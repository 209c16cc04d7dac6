"""How a Llama is fitted to a layout: the one place for its tensor-parallel plan, pipeline stages, loss and
activation checkpointing, and where it is built for a rank (`build_model`).

llama.py knows nothing of this. The model is built on the meta device (no storage), split for the layout
there (the TP plan swaps its linear layers for tensor-parallel ones; the pipeline split builds only this
rank's stages; context parallelism wraps each block's attention core, parallel/sequence.py), and only then does
each parameter get storage for this rank's slice (materialize.py). With document masking a stage's input and
output is the tuple (activations or token ids, document ids, positions), with context parallelism and no masking
(activations or token ids, positions): the document ids and positions travel with the activations from stage to
stage. Both keep the model's
parameter names (a stage `3` holding `layers.2....`), so `full_state_dict` can gather a layout back into the
names of a one-process Llama (and of Hugging Face's, less the `model.` prefix).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.checkpoint import constants as uc
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from distlm.config import ModelConfig
from distlm.model.llama import Block, Experts, Llama, MoE, RMSNorm, cross_entropy, rope_and_mask, rope_cache
from distlm.model.materialize import allocate, canonical_name, materialize
from distlm.parallel.layout import Layout
from distlm.parallel.sequence import SequenceParallelAttention
from distlm.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy,
                                    VocabParallelEmbedding, copy_to_tp, mark_tensor_parallel, padded_vocab_size,
                                    reduce_from_tp)

PARTITION_METHODS = {"blocks": "type:BlockStage", "parameters": "parameters", "uniform": "uniform"}


def build_model(cfg: ModelConfig, layout: Layout, source, partition: str, checkpoint_interval: int,
                zero3_config: dict | None = None, grad_accum: int = 1) -> nn.Module:
    """This rank's part of the model, filled from `source` (materialize.InitialWeights or SafetensorsWeights):
    a Llama (tensor-parallel when tp > 1) or, when pp > 1, a PipelineModule of this rank's stages.
    `zero3_config`: the DeepSpeed config, when ZeRO-3 partitions the parameters as they are built.
    `grad_accum`: micro-batches per step (DeepSpeed divides the loss by it; the MoE losses are divided alike)."""
    if layout.pp > 1:
        module = pipeline_stages(cfg, layout, partition, checkpoint_interval)
    else:
        with torch.device("meta"):
            module = Llama(cfg)
            if layout.tp > 1:
                tensor_parallel(module, layout)
        for block in module.layers:
            context_parallel(block, layout)
        module.loss_fn = loss_function(cfg, layout)
        module.activation_checkpoint_interval = checkpoint_interval
    materialize(module, cfg, layout, source, zero3_config)
    for moe in (m for m in module.modules() if isinstance(m, MoE)):
        moe.aux_grad_scale = 1.0 / grad_accum
    # Saved with every checkpoint, so that it can be resumed at any other layout.
    module.universal_checkpoint_info = universal_checkpoint_info(cfg.vocab_size, moe=cfg.moe is not None)
    return module


def loss_function(cfg: ModelConfig, layout: Layout) -> nn.Module:
    """Cross-entropy; over the vocabulary split across the TP group when tp > 1."""
    if layout.tp == 1:
        return cross_entropy
    local_vocab = padded_vocab_size(cfg.vocab_size, layout.tp) // layout.tp
    return VocabParallelCrossEntropy(layout.tp_group, layout.tp_rank, local_vocab, cfg.vocab_size)


def _split_block(block: Block, layout: Layout) -> None:
    tp, group = layout.tp, layout.tp_group
    attn, mlp = block.self_attn, block.mlp

    def column(lin: nn.Linear) -> ColumnParallelLinear:
        return ColumnParallelLinear(lin.in_features, lin.out_features, group, tp)

    def row(lin: nn.Linear) -> RowParallelLinear:
        return RowParallelLinear(lin.in_features, lin.out_features, group, tp)

    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (column(attn.q_proj), column(attn.k_proj),
                                                          column(attn.v_proj), row(attn.o_proj))
    attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp  # whole KV groups per rank
    if isinstance(mlp, MoE):
        mlp.experts = TensorParallelExperts(mlp.experts, group, layout.tp_rank, tp)
    else:
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = column(mlp.gate_proj), column(mlp.up_proj), row(mlp.down_proj)


class TensorParallelExperts(Experts):
    """Expert parallelism inside the TP group: this rank holds units [rank, rank + 1) * units / tp of the experts
    (whole experts when tp divides their number, else a part of each), computes them for the tokens routed there,
    and the group sums the results, as a column layer feeding a row layer does. Every rank of the group has the
    same tokens (TP replicates activations), so no token moves: the cost is the all-reduce a dense MLP has too."""

    def __init__(self, full: Experts, group, rank: int, tp: int):
        units = full.gate_proj.shape[0] // tp
        super().__init__(full.down_proj.shape[0], full.n, full.ffn, units, first_unit=rank * units)
        self.group = group
        for p, dim in ((self.gate_proj, 0), (self.up_proj, 0), (self.down_proj, 1)):
            mark_tensor_parallel(p, dim)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Gradients of the inputs (and of the router's weights) from the experts of every rank are summed.
        x, weights = copy_to_tp(x, self.group), copy_to_tp(weights, self.group)
        return reduce_from_tp(super().forward(x, experts, weights), self.group)


def context_parallel(block: Block, layout: Layout) -> None:
    """With cp > 1, the block's attention attends over the whole sequence from this rank's slice of it."""
    if layout.cp > 1:
        attn = block.self_attn
        attn.attend = SequenceParallelAttention(attn.attend, layout.cp_group, layout.cp)


def _split_embedding(cfg: ModelConfig, layout: Layout) -> VocabParallelEmbedding:
    padded = padded_vocab_size(cfg.vocab_size, layout.tp)
    return VocabParallelEmbedding(padded, cfg.dim, layout.tp_group, layout.tp_rank, layout.tp)


def _split_head(cfg: ModelConfig, layout: Layout) -> ColumnParallelLinear:
    padded = padded_vocab_size(cfg.vocab_size, layout.tp)  # zero rows, masked in the loss
    return ColumnParallelLinear(cfg.dim, padded, layout.tp_group, layout.tp)


def tensor_parallel(model: Llama, layout: Layout) -> Llama:
    """Split attention heads, MLP and vocabulary over the TP group (in place). The new layers are created
    empty on the default device: build under `torch.device("meta")`, then materialize."""
    for block in model.layers:
        _split_block(block, layout)
    embed, head = _split_embedding(model.cfg, layout), _split_head(model.cfg, layout)
    if model.cfg.tie_embeddings:
        head.weight = embed.weight
    model.embed_tokens, model.lm_head = embed, head
    return model


def _embedding(cfg: ModelConfig, layout: Layout) -> nn.Module:
    return _split_embedding(cfg, layout) if layout.tp > 1 else nn.Embedding(cfg.vocab_size, cfg.dim)


def _head(cfg: ModelConfig, layout: Layout) -> nn.Module:
    return _split_head(cfg, layout) if layout.tp > 1 else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)


class EmbedStage(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout):
        super().__init__()
        with torch.device("meta"):
            self.embed_tokens = _embedding(cfg, layout)
        allocate(self)

    def forward(self, ids: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if isinstance(ids, tuple):  # (token ids, [document ids,] positions)
            return (self.embed_tokens(ids[0]), *ids[1:])
        return self.embed_tokens(ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The output head of tied embeddings, on the last stage."""
        if isinstance(self.embed_tokens, VocabParallelEmbedding):
            x = copy_to_tp(x, self.embed_tokens.group)
        return F.linear(x, self.embed_tokens.weight)


class BlockStage(nn.Module):
    def __init__(self, index: int, cfg: ModelConfig, layout: Layout, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        with torch.device("meta"):
            block = Block(cfg, index)
            if layout.tp > 1:
                _split_block(block, layout)
        context_parallel(block, layout)
        self.layers = nn.ModuleDict({str(index): block})  # keeps the name layers.<index>.*
        allocate(self)
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
        (block,) = self.layers.values()
        x, *extra = x if isinstance(x, tuple) else (x,)
        doc_ids, positions = (None, *extra) if len(extra) == 1 else (extra or (None, None))
        cos, sin, mask = rope_and_mask(self.rope_cos, self.rope_sin, x.shape[1], doc_ids, positions)
        x = block(x, cos, sin, mask)
        return (x, *extra) if extra else x


class NormStage(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        with torch.device("meta"):
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        allocate(self)

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        return self.norm(x[0] if isinstance(x, tuple) else x)


class HeadStage(NormStage):
    def __init__(self, cfg: ModelConfig, layout: Layout):
        super().__init__(cfg)
        with torch.device("meta"):
            self.lm_head = _head(cfg, layout)
        allocate(self)

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        return self.lm_head(super().forward(x))


def _unembed(stage: EmbedStage, x: torch.Tensor) -> torch.Tensor:
    return stage.unembed(x)


def pipeline_stages(cfg: ModelConfig, layout: Layout, partition: str, checkpoint_interval: int) -> PipelineModule:
    """The model as a sequence of DeepSpeed pipeline stages: embedding, one stage per block, head. Given as
    LayerSpecs, so each rank builds only its own stages (with uninitialized storage, filled by materialize)."""
    cos, sin = rope_cache(cfg)
    blocks = [LayerSpec(BlockStage, i, cfg, layout, cos, sin) for i in range(cfg.n_layers)]
    if cfg.tie_embeddings:
        # One matrix on the first and the last stage: DeepSpeed keeps the copies equal by summing their
        # gradients across the two stages.
        first = TiedLayerSpec("embed", EmbedStage, cfg, layout, tied_weight_attr="embed_tokens.weight")
        last = [LayerSpec(NormStage, cfg),
                TiedLayerSpec("embed", EmbedStage, cfg, layout, forward_fn=_unembed,
                              tied_weight_attr="embed_tokens.weight")]
    else:
        first, last = LayerSpec(EmbedStage, cfg, layout), [LayerSpec(HeadStage, cfg, layout)]
    return PipelineModule(layers=[first, *blocks, *last], topology=layout.topology, loss_fn=loss_function(cfg, layout),
                          partition_method=PARTITION_METHODS[partition],
                          activation_checkpoint_interval=checkpoint_interval,
                          # Only blocks: a reentrant checkpoint around the embedding (integer input) would
                          # cut its gradient.
                          checkpointable_layers=["BlockStage"])


def universal_checkpoint_info(vocab_size: int, moe: bool = False) -> dict:
    """How each parameter is split, for DeepSpeed's universal checkpoints (`ds_to_universal` merges the
    slices of a checkpoint by these rules; loading re-slices them for any other layout). Patterns are
    `re.match`ed against parameter names of any layout (`5.layers.3.self_attn.o_proj.weight`, ...), and each must
    match some parameter (DeepSpeed asserts it): the experts' and the router's only with sparse blocks (`moe`).
    Column-parallel weights (q/k/v, gate/up) are DeepSpeed's default: split along dim 0."""
    row_parallel, replicated = [r".*\.(o_proj|down_proj)\.weight$"], [r".*norm\.weight$"]
    if moe:  # experts' units are split like a dense MLP's (gate_proj and up_proj rows, down_proj columns); the
        row_parallel.append(r".*\.experts\.down_proj$")  # router is replicated
        replicated.append(r".*\.mlp\.gate\.weight$")
    return {
        uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        uc.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
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
