"""`distlm plan`: parameters and per-GPU memory of a model under a parallel layout, and whether it fits.

Model states follow DeepSpeed's accounting (its `estimate_zero2/3_model_states_mem_needs`), per
parameter held by a rank, in mixed 16-bit precision:
    16-bit weights 2 B    16-bit gradients 2 B    fp32 gradients 4 + fp32 weights 4 + Adam m, v 8 = 16 B
ZeRO-1 shards the 16 fp32 bytes over data-parallel ranks, ZeRO-2 also the 16-bit gradients, ZeRO-3 also
the weights; its 16-bit gradients exist only for the layer at work, in a working set of 4 B per
parameter of the largest layer (its gathered weights and gradients). In fp32 training
the weights and gradients take 4 B each and the optimizer 8 B (Adam m, v; no master copy).
A rank holds 1/tp of its pipeline stage's parameters (norms are small and counted whole).

Activations per block, per token, in the activation dtype (SDPA/flash attention: no seq x seq scores):
    replicated across TP: the block input, two norm outputs, the residual      4 * dim
    split by TP: q, k, v, attention output                                     (2 * dim + 2 * kv_dim) / tp
    split by TP: gate, up, silu(gate), gate * up                               4 * ffn_dim / tp
With activation checkpointing a block keeps only its input (dim per token), plus one block recomputed.
The last stage also holds fp32 logits for the loss: vocab / tp per token. A 1F1B pipeline's first stage
keeps min(pp, grad_accum) micro-batches in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from distlm.config import Config, ModelConfig, Precision, raise_if, validate_layout
from distlm.parallel.tensor import padded_vocab_size

log = logging.getLogger(__name__)

GiB = 2**30
HEADROOM = 0.9  # the CUDA context, NCCL buffers and fragmentation take the rest


def block_params(m: ModelConfig) -> int:
    kv_dim = m.n_kv_heads * m.head_dim
    attention = m.dim * m.n_heads * m.head_dim * 2 + m.dim * kv_dim * 2  # q, o and k, v
    return attention + 3 * m.dim * m.ffn_dim + 2 * m.dim  # SwiGLU's three matrices, two norms


def total_params(m: ModelConfig) -> int:
    embeddings = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    return m.n_layers * block_params(m) + embeddings + m.dim


def stage_blocks(n_layers: int, pp: int) -> list[int]:
    """Blocks per pipeline stage, as an even split gives them (the first stages take the remainder)."""
    return [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]


def rank_params(m: ModelConfig, tp: int, pp: int) -> int:
    """Parameters held by one rank of the heaviest pipeline stage."""
    vocab_rows = padded_vocab_size(m.vocab_size, tp) // tp
    per_stage = []
    for s, blocks in enumerate(stage_blocks(m.n_layers, pp)):
        n = blocks * block_params(m) // tp
        if s == 0:
            n += vocab_rows * m.dim
        if s == pp - 1:
            n += m.dim + (vocab_rows * m.dim if (not m.tie_embeddings or pp > 1) else 0)
        per_stage.append(n)
    return max(per_stage)


def largest_layer_params(m: ModelConfig, tp: int) -> int:
    return max(block_params(m), m.vocab_size * m.dim) // tp


@dataclass
class MemoryPlan:
    params: int
    params_per_rank: int
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    activations: float  # with the configured checkpointing
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    gpu_bytes: float

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.gpu_bytes


def model_states(n: int, dp: int, zero: int, mixed: bool, offload_optimizer: bool, offload_params: bool,
                 largest_layer: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes on one GPU for n parameters held by its rank."""
    weight_b, grad_b, optim_b = (2, 2, 16) if mixed else (4, 4, 8)
    weights = n * weight_b / (dp if zero >= 3 else 1)
    grads = 0.0 if zero >= 3 else n * grad_b / (dp if zero == 2 else 1)
    optimizer = n * optim_b / (dp if zero >= 1 else 1)
    if offload_optimizer:  # fp32 state lives in CPU memory; gradients stream there as they are reduced
        optimizer = 0.0
        grads = grads if zero < 2 else 0.0
    if offload_params:
        weights = 0.0
    if zero >= 3:  # the largest layer's weights and gradients, gathered while it runs
        weights += (weight_b + grad_b) * largest_layer
    return weights, grads, optimizer


def activation_bytes(m: ModelConfig, c: Config, blocks: int, checkpointing: bool) -> float:
    t, tp = c.trainer, c.parallel.tp
    tokens = t.micro_batch_size * c.data.seq_len
    dtype_b = 2 if t.precision == Precision.bf16 else 4
    kv_dim = m.n_kv_heads * m.head_dim
    per_block = 4 * m.dim + (2 * m.dim + 2 * kv_dim + 4 * m.ffn_dim) / tp
    if checkpointing:
        stored = blocks * m.dim + per_block  # every block's input, and one block being recomputed
    else:
        stored = blocks * per_block
    in_flight = min(c.parallel.pp, t.grad_accum) if c.parallel.pp > 1 else 1
    logits = 4 * padded_vocab_size(m.vocab_size, tp) / tp  # fp32 for the loss, on the last stage
    return tokens * (stored * dtype_b * in_flight + logits)


def plan(c: Config) -> MemoryPlan:
    m, par = c.model, c.parallel
    raise_if(validate_layout(c))
    n_rank = rank_params(m, par.tp, par.pp)
    weights, grads, optimizer = model_states(
        n_rank, c.data_parallel_size, par.zero_stage, c.trainer.precision == Precision.bf16,
        par.offload_optimizer, par.offload_params, largest_layer_params(m, par.tp))
    blocks = max(stage_blocks(m.n_layers, par.pp))
    without = activation_bytes(m, c, blocks, checkpointing=False)
    with_ = activation_bytes(m, c, blocks, checkpointing=True)
    return MemoryPlan(params=total_params(m), params_per_rank=n_rank, weights=weights, gradients=grads,
                      optimizer=optimizer, activations=with_ if par.activation_checkpoint_interval else without,
                      activations_without_checkpointing=without, activations_with_checkpointing=with_,
                      gpu_bytes=c.cluster.gpu_mem_gb * GiB)


def print_plan(c: Config) -> MemoryPlan:
    p, par = plan(c), c.parallel
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"model        {p.params / 1e9:.3f} B parameters ({c.model.n_layers} layers, dim {c.model.dim}, "
        f"{c.model.n_heads} heads / {c.model.n_kv_heads} KV heads, ffn {c.model.ffn_dim}, vocab {c.model.vocab_size})",
        f"layout       {c.cluster.num_workers} GPUs = tp {par.tp} x pp {par.pp} x dp {c.data_parallel_size}; "
        f"ZeRO-{par.zero_stage}; {c.trainer.precision.value}; micro-batch {c.trainer.micro_batch_size} x "
        f"{c.data.seq_len} tokens, grad accum {c.trainer.grad_accum}",
        f"per GPU      {p.params_per_rank / 1e6:,.1f} M parameters held",
        f"  weights      {gib(p.weights)}",
        f"  gradients    {gib(p.gradients)}",
        f"  optimizer    {gib(p.optimizer)}" + ("   (offloaded to CPU)" if par.offload_optimizer else ""),
        f"  activations  {gib(p.activations_without_checkpointing)}   without checkpointing",
        f"               {gib(p.activations_with_checkpointing)}   with checkpointing (every block)",
        f"  total        {gib(p.total)}   of {c.cluster.gpu_mem_gb:g} GiB "
        f"({'checkpointing on' if par.activation_checkpoint_interval else 'checkpointing off'})",
        f"verdict      {'fits' if p.fits else 'does NOT fit'} (budget {HEADROOM:.0%} of the GPU)",
    ]
    if not p.fits:
        lines.append("             to fit: raise parallel.zero_stage, parallel.tp or parallel.pp, turn on "
                     "parallel.activation_checkpoint_interval=1, lower trainer.micro_batch_size, or add GPUs")
    print("\n".join(lines))
    return p
