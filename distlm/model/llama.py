"""A Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention.

Reads top to bottom like nanoGPT. It knows nothing of parallelism: DeepSpeed and the parallel layout
wrap it from outside. Parameter names and the rotate-half RoPE follow Hugging Face's Llama, so the
export is a rename and nothing is permuted.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from distlm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as Llama does, then return to the activation dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The rotation frequency of each pair of head dimensions: theta^(-2i/head_dim), stretched for long contexts
    by Llama 3's scaling (cfg.rope_scaling): low frequencies divided by its factor, high ones kept, a smooth
    blend between (as Hugging Face's rope_type 'llama3' computes them)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > s.original_max_seq_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= s.original_max_seq_len / s.high_freq_factor) & (wavelen <= s.original_max_seq_len / s.low_freq_factor)
    return torch.where(medium, blended, scaled)


def rope_cache(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq_len, head_dim] of every position's rotation angles."""
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), rope_frequencies(cfg))
    angles = torch.cat([angles, angles], dim=-1)  # [seq, head_dim]: the two halves share frequencies
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [batch, heads, seq, head_dim] by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its document, from doc_ids [batch, seq] (the document number of each
    token in a packed sample, non-decreasing along seq)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def document_inputs(starts: torch.Tensor, restart_positions: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, position_ids) [batch, seq] of packed samples' inputs, from where documents start in them (bool or
    0/1 [batch, seq]): each token's document number (0 = the one the sample starts in), and positions that restart
    at 0 in every document, or run 0..seq-1."""
    marks = starts.long()
    marks[:, 0] = 0  # a document starting at 0 is the sample's first either way
    doc_ids = marks.cumsum(dim=1)
    if restart_positions:
        return doc_ids, document_positions(doc_ids)
    return doc_ids, torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor | BlockMask:
    """Causal attention that never crosses a document boundary. On CUDA a flex-attention BlockMask (its
    kernel skips whole blocks of other documents); elsewhere a boolean [batch, 1, seq, seq] mask for SDPA."""
    if doc_ids.is_cuda:
        return flex_document_mask(doc_ids)
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def flex_document_mask(doc_ids: torch.Tensor) -> BlockMask:
    """document_mask for flex_attention: which (query, key) pairs may attend, per batch row, for all heads."""
    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
    seq = doc_ids.shape[1]
    return create_block_mask(same_document_causal, doc_ids.shape[0], None, seq, seq, device=doc_ids.device)


def rope_and_mask(rope_cos: torch.Tensor, rope_sin: torch.Tensor, seq: int, doc_ids: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> tuple:
    """RoPE angles for the positions (0..seq-1 when none are given) and the attention mask (None: causal over
    the whole sample; with doc_ids: inside each document)."""
    if position_ids is None:
        cos, sin = rope_cos[:seq], rope_sin[:seq]
    else:
        cos, sin = rope_cos[position_ids].unsqueeze(1), rope_sin[position_ids].unsqueeze(1)  # [batch, 1, seq, hd]
    return cos, sin, None if doc_ids is None else document_mask(doc_ids)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)  # without compiling it is a slow reference version


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
    """Attention of q [batch, heads, seq, head_dim] over k, v [batch, kv_heads, seq, head_dim] (grouped-query when
    kv_heads < heads): causal when mask is None, else the boolean mask or flex-attention BlockMask."""
    gqa = k.shape[1] != q.shape[1]  # query heads share key/value heads
    if mask is None:  # SDPA picks the flash kernel on GPU
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, BlockMask):
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attend = attend  # over the whole sequence; sequence parallelism wraps it (parallel/sequence.py)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """`n` SwiGLU experts held as one MLP whose hidden units are grouped by expert: units [e * ffn, (e + 1) * ffn)
    are expert e's (rows of gate_proj and up_proj, columns of down_proj). A token passes through the units of its
    chosen experts only. Tensor parallelism gives each rank a contiguous range of units, `first_unit` on: whole
    experts, or a part of each expert when there are more ranks than experts."""

    def __init__(self, dim: int, n: int, ffn: int, units: int | None = None, first_unit: int = 0):
        super().__init__()
        self.n, self.ffn, self.first_unit = n, ffn, first_unit
        units = n * ffn if units is None else units
        # Parameters of this module itself (not nn.Linear children): ZeRO-3 gathers a module's own parameters
        # when its forward runs, and this forward reads them by slices.
        self.gate_proj = nn.Parameter(torch.empty(units, dim).normal_(0.0, dim ** -0.5))
        self.up_proj = nn.Parameter(torch.empty(units, dim).normal_(0.0, dim ** -0.5))
        self.down_proj = nn.Parameter(torch.empty(dim, units).normal_(0.0, units ** -0.5))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for tokens x [tokens, dim], over the units held here.
        The (token, expert) pairs are sorted by expert, so each expert runs one matmul over all of its tokens; the
        experts held here are consecutive, so their pairs are one run of the sorted order."""
        tokens, k = experts.shape
        order = experts.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n).tolist()
        units = self.gate_proj.shape[0]
        first, last = self.first_unit // self.ffn, (self.first_unit + units - 1) // self.ffn
        begin, end = sum(counts[:first]), sum(counts[:last + 1])
        mine = order[begin:end]
        # Each held expert's units, split in one op: its backward assembles the gradients in one copy (a slice
        # per expert would add a parameter-sized gradient per expert).
        sizes = [min((e + 1) * self.ffn - self.first_unit, units) - max(e * self.ffn - self.first_unit, 0)
                 for e in range(first, last + 1)]
        gates, ups, downs = self.gate_proj.split(sizes), self.up_proj.split(sizes), self.down_proj.split(sizes, dim=1)
        h_all, outputs, start = x[mine // k], [], 0
        for i, e in enumerate(range(first, last + 1)):  # even with no tokens: each expert's units get a gradient
            h = h_all[start:start + counts[e]]
            outputs.append((F.silu(h @ gates[i].T) * (h @ ups[i].T)) @ downs[i].T)
            start += counts[e]
        y = torch.cat(outputs) * weights.reshape(-1)[mine].unsqueeze(1)
        # Back to (token, choice) order, zeros for the pairs of other ranks' experts, summed over the choices.
        # (Indexing keeps only the indices for backward; index_add would keep its summands too.)
        y = torch.cat([y.new_zeros(begin, y.shape[1]), y, y.new_zeros(tokens * k - end, y.shape[1])])
        return y[order.argsort()].view(tokens, k, -1).sum(dim=1).to(x.dtype)


class _WithAuxiliaryLoss(torch.autograd.Function):
    """x unchanged; backward also sends `scale` as the gradient of `loss`: a loss that joins the objective where it
    is computed, so it needs no path to the model's output (a pipeline stage's loss stays on its stage)."""

    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.scale, ctx.loss_shape = scale, loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.loss_shape, ctx.scale, device=grad.device), None


class MoE(nn.Module):
    """Sparse MLP (Mixtral's): an fp32 softmax router picks each token's top-k experts and renormalises their
    weights; dropless (every token reaches all of its experts, so no layout changes which tokens are computed).
    In training it adds a load-balancing loss (Switch Transformer: experts * sum_e tokens_e / tokens * mean p_e)
    and a router z-loss (mean logsumexp(logits)^2), weighted by cfg.moe, to the objective."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.top_k, self.aux_loss_weight, self.z_loss_weight = m.top_k, m.aux_loss_weight, m.z_loss_weight
        self.gate = nn.Linear(cfg.dim, m.experts, bias=False)  # the router
        self.experts = Experts(cfg.dim, m.experts, m.expert_ffn_dim)
        # The gradient scale of the objective (DeepSpeed divides the loss by the gradient accumulation steps);
        # set by build_model.
        self.aux_grad_scale = 1.0
        self.stats: list[torch.Tensor] = []  # per training forward: [aux, z, max/mean expert load], for metrics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        logits = self.gate(x).float()
        probs = logits.softmax(dim=-1)
        top, experts = probs.topk(self.top_k, dim=-1)
        y = self.experts(x, experts, top / top.sum(dim=-1, keepdim=True))
        if self.training:
            load = torch.bincount(experts.reshape(-1), minlength=probs.shape[1]).float()
            aux = probs.shape[1] * (load / experts.numel() * probs.mean(dim=0)).sum()
            z = logits.logsumexp(dim=-1).square().mean()
            loss = self.aux_loss_weight * aux + self.z_loss_weight * z
            y = _WithAuxiliaryLoss.apply(y, loss, self.aux_grad_scale)
            # (A block recomputed for activation checkpointing appends the same values again: means and maxima
            # are unchanged.)
            self.stats.append(torch.stack([aux, z, load.max() / load.mean()]).detach())
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.moe and cfg.moe.is_sparse(layer) else MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def initial_std(name: str, cfg: ModelConfig) -> float | None:
    """How parameter `name` starts: normal(0, std), or ones where None (the norm gains). The projections that
    write into the residual stream are scaled down, as GPT-2 does, so its variance does not grow with depth."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
    for block in blocks:
        x = block(x, cos, sin, mask)
    return x


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Set for a layout by distlm/model/parallelize.py build_model (vocabulary-parallel loss under TP).
        self.loss_fn = cross_entropy
        self.activation_checkpoint_interval = 0  # recompute every N blocks in backward (0 = keep activations)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Weights start as torch's defaults here; training draws them by `initial_std`
        # (distlm/model/materialize.py), the same numbers in every layout.

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab]; or, given labels, the mean next-token cross-entropy. With doc_ids (each
        token's document number in a packed sample) attention stays inside each document; position_ids
        [batch, seq] (e.g. document_positions) replace the positions 0..seq-1 of RoPE."""
        cos, sin, mask = rope_and_mask(self.rope_cos, self.rope_sin, input_ids.shape[1], doc_ids, position_ids)
        x = self.embed_tokens(input_ids)
        step = self.activation_checkpoint_interval if self.training else 0
        if step:  # trade compute for memory: keep only each segment's input for backward
            for i in range(0, len(self.layers), step):
                x = checkpoint(_run_blocks, self.layers[i:i + step], x, cos, sin, mask, use_reentrant=False)
        else:
            x = _run_blocks(self.layers, x, cos, sin, mask)
        logits = self.lm_head(self.norm(x))
        return logits if labels is None else self.loss_fn(logits, labels)

    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """Parameters; `active`: those one token uses (top_k of each sparse block's experts)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= sum(p.numel() * (m.experts.n - m.top_k) // m.experts.n for m in self.modules() if isinstance(m, MoE)
                     for p in m.experts.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding and not self.cfg.tie_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per active non-embedding parameter plus attention's score and value
        matmuls (PaLM appendix B: 6N + 12 * layers * dim * seq_len)."""
        c = self.cfg
        return 6 * self.num_params(exclude_embedding=True, active=True) + 12 * c.n_layers * c.dim * seq_len
