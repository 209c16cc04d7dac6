"""Tensor-parallel layers (Megatron-style), generic: they know process groups, not models.

A column-parallel linear holds a slice of the output features, a row-parallel linear a slice of the
input features; a column layer feeding a row layer needs one all-reduce in the forward pass and one in
the backward pass. The vocabulary is split over ranks for the embedding and the output head, and the
cross-entropy is computed on the split logits, so no rank ever holds full-vocabulary logits.

Layers hold only their rank's slice, created empty (on the meta device when built under
`torch.device("meta")`); distlm/model/materialize.py fills them. Each parameter says how it is split
(`partition_dim`), so the same full tensor can be sliced for any layout.

Hand-written rather than DTensor or DeepSpeed AutoTP: DeepSpeed's pipeline engine and ZeRO optimizers
take plain tensors, not DTensors, and AutoTP slices an already built full model with no vocab-parallel loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def mark_tensor_parallel(p: nn.Parameter, dim: int) -> nn.Parameter:
    # DeepSpeed counts a parameter without this mark once per TP group (on TP rank 0) in the global
    # gradient norm: it must know which parameters are split and not replicated.
    p.model_parallel = True
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input feeds every rank's slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum the ranks' partial results); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T: this rank's slice of the output features (no bias, as in Llama).
    `out_features` is the full (padded) count; each rank holds out_features / world rows."""

    def __init__(self, in_features: int, out_features: int, group, world: int):
        super().__init__()
        self.group = group
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features // world, in_features)), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T: input features split, output summed across the group."""

    def __init__(self, in_features: int, out_features: int, group, world: int):
        super().__init__()
        self.group = group
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features, in_features // world)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the (padded) embedding table; other ids read zeros, summed across the group.
    Padding rows (ids >= the real vocabulary) are zeros and never looked up."""

    def __init__(self, padded_vocab: int, dim: int, group, rank: int, world: int):
        super().__init__()
        self.group = group
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(padded_vocab // world, dim)), dim=0)
        self.start = rank * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy over logits split by vocabulary across the TP group."""

    @staticmethod
    def forward(ctx, logits, labels, group, start, vocab_size):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        real = torch.arange(start, start + local_vocab, device=logits.device) < vocab_size
        logits = logits.masked_fill(~real, float("-inf"))  # padding rows never enter the softmax
        logits_max = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)
        local = labels - start
        mine = (local >= 0) & (local < local_vocab)
        target = torch.gather(shifted, -1, local.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
        target = target * mine
        dist.all_reduce(target, group=group)
        loss = (sum_exp.squeeze(-1).log() - target).mean()
        ctx.save_for_backward(exp / sum_exp, local, mine)
        return loss

    @staticmethod
    def backward(ctx, grad):
        probs, local, mine = ctx.saved_tensors
        grad_logits = probs.clone()
        flat = grad_logits.view(-1, grad_logits.shape[-1])
        rows = torch.arange(flat.shape[0], device=flat.device)[mine.view(-1)]
        flat[rows, local.view(-1)[mine.view(-1)]] -= 1.0
        return grad_logits * (grad / local.numel()), None, None, None, None


class VocabParallelCrossEntropy(nn.Module):
    def __init__(self, group, rank: int, local_vocab: int, vocab_size: int):
        super().__init__()
        self.group, self.start, self.vocab_size = group, rank * local_vocab, vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCrossEntropy.apply(logits, labels, self.group, self.start, self.vocab_size)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up so every TP rank holds the same number of rows."""
    return -(-vocab_size // tp) * tp
