"""Context (sequence) parallelism, Ulysses-style: the ranks of a context-parallel group each hold a contiguous
slice of every sample's sequence, and attention trades heads for sequence.

Everything outside attention works token by token, so a rank computes it on its slice alone. Attention needs the
whole sequence: after RoPE (applied with each token's global position), q, k and v go through one all-to-all each
that sends head group j of every rank to rank j, so each rank holds all tokens of heads / cp of the heads; it
attends over the whole sequence (causal, or inside documents with the whole sequence's document ids), and a last
all-to-all sends each token's result back to the rank that holds the token. Per layer that is 4 all-to-alls of
(cp - 1) / cp of the rank's q, k, v and output activations.

Heads are split by TP first, then by CP: a rank's query heads n_heads / tp must divide by cp. Key/value heads
(grouped-query attention) that do not are replicated first, to the least multiple of cp that keeps every query
head's group whole (repeat_interleave: the gradient of the copies sums back into the heads they came from).

DeepSpeed's `DistributedAttention` is not used: it asserts at least cp KV heads instead of replicating them,
expects [batch, seq, heads, dim] where distlm's attention works in [batch, heads, seq, dim], and its exchange is an
autograd.Function that torch.compile traces into zero gradients (DeepSpeed's own note); distlm uses DeepSpeed's
compile-safe exchange operator instead (compat.deepspeed.all_to_all_first_dim).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from distlm.compat.deepspeed import all_to_all_first_dim, register_all_to_all_group


def kv_replication(kv_heads: int, cp: int) -> int:
    """How many copies of each key/value head a rank makes so that its KV heads divide by cp."""
    return cp // math.gcd(kv_heads, cp)


def heads_to_sequence(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[batch, heads, seq / cp, dim] (this rank's tokens, all heads) -> [batch, heads / cp, seq, dim] (all tokens,
    this rank's share of the heads); the sequence is the ranks' slices in rank order."""
    b, h, s, d = x.shape
    x = x.reshape(b, cp, h // cp, s, d).transpose(0, 1)  # [cp: head group, b, h/cp, s, d]
    x = all_to_all_first_dim(group, x.contiguous())  # [cp: the rank whose tokens these are, ...]
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d)


def sequence_to_heads(y: torch.Tensor, group, cp: int) -> torch.Tensor:
    """The inverse of heads_to_sequence. The result is laid out [batch, seq / cp, heads, dim] in memory (a
    transposed view), so the attention's output projection reads it without another copy to keep for backward."""
    b, h, full, d = y.shape
    y = y.reshape(b, h, cp, full // cp, d).permute(2, 0, 1, 3, 4)  # [cp: token slice, b, h, s, d]
    y = all_to_all_first_dim(group, y.contiguous())  # [cp: the rank whose heads these are, ...]
    return y.permute(1, 3, 0, 2, 4).reshape(b, full // cp, cp * h, d).transpose(1, 2)


class SequenceParallelAttention:
    """An attention core (llama.attend) over the whole sequence for ranks that each hold a slice of it."""

    def __init__(self, attend: Callable, group, cp: int):
        self.attend, self.group, self.cp = attend, group, cp
        register_all_to_all_group(group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        copies = kv_replication(k.shape[1], self.cp)
        if copies > 1:
            k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
        q, k, v = (heads_to_sequence(t, self.group, self.cp) for t in (q, k, v))
        return sequence_to_heads(self.attend(q, k, v, mask), self.group, self.cp)
