"""`distlm plan`: what a model needs per rank and per node under a parallel layout, and whether it fits.

Host memory at start-up (per rank; a node holds cluster.workers_per_node ranks). The model is built on
the meta device and each rank materializes only its own slice of each parameter, in fp32, one tensor at
a time (the full tensor is generated from a seed of its name and sliced), so a rank's peak is
    4 B x the parameters it holds (its TP slice of its pipeline stage; / dp under ZeRO-3)
  + 4 B x the largest full tensor of the model
  + cluster.host_overhead_gb (CUDA context, torch and Ray processes, pinned buffers)
DeepSpeed casts the built weights to bf16 and moves them to the GPU before it creates the optimizer, so
offloaded optimizer states (16 B per parameter of the rank's ZeRO shard: fp32 weights, gradients, Adam
m and v; + the 16-bit weights under parameter offload) replace, not add to, the built weights. In training,
an asynchronous checkpoint (trainer.async_checkpoint) copies the states the rank writes to host memory: its
weights (16-bit or fp32; none in ZeRO-3's model file) + 12 B per parameter of its optimizer shard (fp32 master,
Adam m, v); the buffers are kept from one save to the next (checkpoint_snapshot_bytes).

Device memory in training. Model states follow DeepSpeed's accounting (its
`estimate_zero2/3_model_states_mem_needs`), per parameter held by a rank, in mixed 16-bit precision:
    16-bit weights 2 B    16-bit gradients 2 B    fp32 gradients 4 + fp32 weights 4 + Adam m, v 8 = 16 B
ZeRO-1 shards the 16 fp32 bytes over data-parallel ranks, ZeRO-2 also the 16-bit gradients, ZeRO-3 also
the weights; its 16-bit gradients exist only for the layer at work, in a working set of 4 B per
parameter of the largest layer (its gathered weights and gradients). In fp32 training
the weights and gradients take 4 B each and the optimizer 8 B (Adam m, v; no master copy).

Activations: the bytes autograd saves for backward, per token, b = bytes of the activation dtype
(tests/test_plan_activations.py counts them in a real forward pass). Per block:
    two RMSNorms: fp32 input (the input itself in fp32), normalized, scaled output   2 * (4 + 2b) * dim
                  and their fp32 1/rms                                                2 * 4
    split by TP: q and k after RoPE, v, attention output                             b * (2 dim + 2 kv_dim) / tp
                 and SDPA's fp32 log-sum-exp (no seq x seq scores)                    4 * n_heads / tp
    split by TP: gate, silu(gate), up, silu(gate) * up                                4 * b * ffn_dim / tp
The last stage adds the final norm and the fp32 log-probabilities (4 * vocab / tp), the first and last
stage 8 B of token ids. Context parallelism (cp) divides the tokens a rank holds by cp; per token it saves one
more output (the attention's, exchanged back: the projection's input), its k and v with the KV heads
replicated to a multiple of cp (parallel/sequence.py), and RoPE's cos and sin at its positions (2 b head_dim)
with the positions (8 B).
ZeRO partitions over data x context ranks. Activation checkpointing every k blocks keeps each segment's input (b * dim)
and recomputes one segment (k blocks) at a time in backward. A 1F1B pipeline's stage s keeps
min(pp - s, grad_accum) micro-batches in flight, and its input and output (b * dim each) for each.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass

from distlm.config import Config, ModelConfig, Precision, raise_if
from distlm.parallel.sequence import kv_replication
from distlm.parallel.tensor import padded_vocab_size
from distlm.validation import node_placement_problems, validate_cluster, validate_layout

GiB = 2**30
FP32 = 4  # bytes: start-up builds every weight in fp32


def block_params(m: ModelConfig) -> int:
    kv_dim = m.n_kv_heads * m.head_dim
    attention = m.dim * m.n_heads * m.head_dim * 2 + m.dim * kv_dim * 2  # q, o and k, v
    return attention + 3 * m.dim * m.ffn_dim + 2 * m.dim  # SwiGLU's three matrices, two norms


def total_params(m: ModelConfig) -> int:
    embeddings = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    return m.n_layers * block_params(m) + embeddings + m.dim


def largest_tensor_params(m: ModelConfig) -> int:
    """The largest single weight, whole: the embedding (or head) or an MLP matrix."""
    return max(m.vocab_size * m.dim, m.ffn_dim * m.dim, m.n_heads * m.head_dim * m.dim)


def stage_blocks(n_layers: int, pp: int) -> list[int]:
    """Blocks per pipeline stage, as an even split gives them (the first stages take the remainder)."""
    return [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]


def stage_params(m: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage (its TP slice)."""
    vocab_rows = padded_vocab_size(m.vocab_size, tp) // tp
    per_stage = []
    for s, blocks in enumerate(stage_blocks(m.n_layers, pp)):
        n = blocks * block_params(m) // tp
        if s == 0:
            n += vocab_rows * m.dim
        if s == pp - 1:
            n += m.dim + (vocab_rows * m.dim if (not m.tie_embeddings or pp > 1) else 0)
        per_stage.append(n)
    return per_stage


def rank_params(m: ModelConfig, tp: int, pp: int) -> int:
    """Parameters held by one rank of the heaviest pipeline stage."""
    return max(stage_params(m, tp, pp))


def largest_layer_params(m: ModelConfig, tp: int) -> int:
    return max(block_params(m), m.vocab_size * m.dim) // tp


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


def offloaded_host_bytes(n: int, dp: int, zero: int, mixed: bool, offload_optimizer: bool,
                         offload_params: bool) -> float:
    """Host bytes of one rank's offloaded states in training (fp32 weights, gradients, Adam m, v)."""
    shard = n / dp if zero >= 1 else n
    host = 16 * shard if offload_optimizer else 0.0
    if offload_params:
        host += (2 if mixed else 4) * n / dp
    return host


def checkpoint_snapshot_bytes(n: int, dp: int, zero: int, mixed: bool) -> float:
    """Host bytes an asynchronous checkpoint copies on the rank that writes the most: its stage's weights (written
    by data-parallel rank 0; ZeRO-3 writes none in the model file, its weights are the fp32 partitions) and its
    optimizer shard: fp32 master weights (ZeRO keeps its own fp32 partition even in fp32 training, and bf16 has them
    anyway) and Adam's m and v, partitioned over data-parallel ranks under ZeRO and bf16's optimizer."""
    weights = 0 if zero >= 3 else n * (2 if mixed else 4)
    optimizer = n * ((4 if zero >= 1 or mixed else 0) + 8)
    return weights + optimizer / (dp if zero >= 1 or mixed else 1)


def block_activation_bytes(m: ModelConfig, tp: int, dtype_b: int, cp: int = 1) -> float:
    """Bytes one block saves for backward, per token of the rank's slice (see the module docstring)."""
    kv_dim, outputs = m.n_kv_heads * m.head_dim, 1
    if cp > 1:  # attention saves the exchanged q, k, v (KV heads replicated to a multiple of cp) and output, and
        kv_dim *= kv_replication(m.n_kv_heads // tp, cp)  # the output projection its input, exchanged back
        outputs = 2
    norms = 2 * ((FP32 + 2 * dtype_b) * m.dim + 4)
    attention = (dtype_b * ((1 + outputs) * m.dim + 2 * kv_dim) + 4 * m.n_heads) / tp
    mlp = 4 * dtype_b * m.ffn_dim / tp
    return norms + attention + mlp


def head_activation_bytes(m: ModelConfig, tp: int, dtype_b: int) -> float:
    """Bytes the last stage saves per token after the blocks: final norm, fp32 log-probabilities, labels."""
    return (FP32 + 2 * dtype_b) * m.dim + 4 + 4 * padded_vocab_size(m.vocab_size, tp) / tp + 8


def saved_bytes_per_token(m: ModelConfig, tp: int, dtype_b: int, blocks: int, checkpoint_interval: int,
                          first: bool, last: bool, cp: int = 1) -> float:
    """Bytes a pipeline stage of `blocks` blocks saves for backward in its forward pass, per token it holds."""
    if checkpoint_interval:  # only each segment's input
        saved = math.ceil(blocks / checkpoint_interval) * dtype_b * m.dim
    else:
        saved = blocks * block_activation_bytes(m, tp, dtype_b, cp)
    positions = 2 * dtype_b * m.head_dim + 8 if cp > 1 else 0  # RoPE's cos and sin at the slice's positions, and them
    return saved + positions + (8 if first else 0) + (head_activation_bytes(m, tp, dtype_b) if last else 0)


def stage_activation_bytes(c: Config, checkpoint_interval: int) -> list[float]:
    """Activation bytes of one rank of each pipeline stage, at the peak of its backward pass (a context-parallel
    rank holds seq_len / cp tokens of each sample)."""
    m, t, tp, pp, cp = c.model, c.trainer, c.parallel.tp, c.parallel.pp, c.parallel.cp
    tokens = t.micro_batch_size * c.data.seq_len // cp
    b = 2 if t.precision == Precision.bf16 else 4
    out = []
    for s, blocks in enumerate(stage_blocks(m.n_layers, pp)):
        saved = saved_bytes_per_token(m, tp, b, blocks, checkpoint_interval, s == 0, s == pp - 1, cp)
        # backward recomputes one checkpointed segment at a time
        recomputed = min(checkpoint_interval, blocks) * block_activation_bytes(m, tp, b, cp) \
            if checkpoint_interval else 0
        in_flight = min(pp - s, t.grad_accum) if pp > 1 else 1
        buffers = 2 * b * m.dim if pp > 1 else 0  # the pipeline engine holds the stage's input and output
        out.append(tokens * (in_flight * (saved + buffers) + recomputed))
    return out


def node_workers(c: Config) -> int:
    """Training workers on one (full) node."""
    per_node = c.cluster.workers_per_node
    return c.cluster.num_workers if per_node is None else min(per_node, c.cluster.num_workers)


def host_mem_bytes(c: Config) -> float:
    if c.cluster.host_mem_gb is not None:
        return c.cluster.host_mem_gb * GiB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # this machine


@dataclass
class MemoryPlan:
    params: int
    params_per_rank: int         # held by one rank of the heaviest stage (before ZeRO-3's split)
    # device, one GPU of the stage that needs the most
    weights: float
    gradients: float
    optimizer: float
    activations: float           # with the configured checkpointing
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    device_total: float
    device_budget: float         # plan_headroom x gpu_mem_gb
    # host, per rank
    startup_weights: float       # its share of the fp32 weights, as they are built
    startup_largest_tensor: float
    offloaded: float             # offloaded optimizer states (and parameters) in training
    checkpoint_snapshot: float   # trainer.async_checkpoint: its model + optimizer states, copied while a save is written
    host_overhead: float
    workers_per_node: int
    host_budget: float           # plan_headroom x host_mem_gb, per node

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def host_in_training(self) -> float:
        return self.offloaded + self.checkpoint_snapshot

    @property
    def host_per_rank(self) -> float:
        return max(self.startup_weights + self.startup_largest_tensor, self.host_in_training) + self.host_overhead

    @property
    def host_per_node(self) -> float:
        return self.workers_per_node * self.host_per_rank

    @property
    def fits_device(self) -> bool:
        return self.device_total <= self.device_budget

    @property
    def fits_host(self) -> bool:
        return self.host_per_node <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def problems(self) -> list[str]:
        """What does not fit, each naming the memory, the need and the budget."""
        p = []
        if not self.fits_host:
            when = "start-up" if self.startup_weights + self.startup_largest_tensor >= self.host_in_training \
                else "training" + (" (with an asynchronous checkpoint's copy: trainer.async_checkpoint=false saves "
                                   "without it)" if self.checkpoint_snapshot else "")
            p.append(f"host memory at {when}: {self.host_per_node / GiB:,.1f} GiB per node "
                     f"> {self.host_budget / GiB:,.1f} GiB budget")
        if not self.fits_device:
            p.append(f"device memory in training: {self.device_total / GiB:,.1f} GiB per GPU "
                     f"> {self.device_budget / GiB:,.1f} GiB budget")
        return p


def plan(c: Config) -> MemoryPlan:
    m, par, cl = c.model, c.parallel, c.cluster
    raise_if(validate_layout(c) + validate_cluster(c))
    # ZeRO partitions over the data x context ranks (parallel/layout.py): they all hold the same parameters.
    dp, mixed = c.data_parallel_size * par.cp, c.trainer.precision == Precision.bf16
    largest_layer = largest_layer_params(m, par.tp)
    interval = par.activation_checkpoint_interval
    without = stage_activation_bytes(c, 0)
    with_ = stage_activation_bytes(c, interval or 1)
    configured = with_ if interval else without
    # The stage that needs the most device memory: the first holds the most micro-batches, the last the logits.
    per_stage = [(model_states(n, dp, par.zero_stage, mixed, par.offload_optimizer, par.offload_params,
                               largest_layer), act) for n, act in zip(stage_params(m, par.tp, par.pp), configured)]
    (weights, grads, optimizer), activations = max(per_stage, key=lambda s: sum(s[0]) + s[1])
    n_rank = rank_params(m, par.tp, par.pp)
    built = n_rank / dp if par.zero_stage >= 3 else n_rank  # ZeRO-3 partitions each parameter as it is built
    return MemoryPlan(
        params=total_params(m), params_per_rank=n_rank, weights=weights, gradients=grads, optimizer=optimizer,
        activations=activations, activations_without_checkpointing=max(without),
        activations_with_checkpointing=max(with_), device_total=weights + grads + optimizer + activations,
        device_budget=cl.plan_headroom * cl.gpu_mem_gb * GiB,
        startup_weights=FP32 * built, startup_largest_tensor=FP32 * largest_tensor_params(m),
        offloaded=offloaded_host_bytes(n_rank, dp, par.zero_stage, mixed, par.offload_optimizer, par.offload_params),
        checkpoint_snapshot=checkpoint_snapshot_bytes(n_rank, dp, par.zero_stage, mixed)
        if c.trainer.async_checkpoint else 0.0,
        host_overhead=cl.host_overhead_gb * GiB, workers_per_node=node_workers(c),
        host_budget=cl.plan_headroom * host_mem_bytes(c))


SEARCHED_KEYS = ("tp", "pp", "cp", "zero_stage", "activation_checkpoint_interval")  # of parallel.*


def with_layout(c: Config, **changes) -> Config:
    return dataclasses.replace(c, parallel=dataclasses.replace(c.parallel, **changes))


def valid_layouts(c: Config):
    """Every layout of the same GPUs that distlm accepts, varying the searched keys."""
    world = c.cluster.num_workers
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    intervals = sorted({c.parallel.activation_checkpoint_interval, 0, 1})
    for tp, pp, cp, zero, interval in itertools.product(divisors, divisors, divisors, range(4), intervals):
        if world % (tp * pp * cp):
            continue
        layout = with_layout(c, tp=tp, pp=pp, cp=cp, zero_stage=zero, activation_checkpoint_interval=interval)
        if not validate_layout(layout) and not node_placement_problems(world, tp, c.cluster.workers_per_node):
            yield layout


def suggest_layout(c: Config) -> tuple[dict[str, int], MemoryPlan] | None:
    """A layout of the same GPUs that fits, with the fewest changed keys; among those the least model
    parallelism (tp x pp x cp), the lowest ZeRO stage, then no recomputation. None if nothing fits."""
    best = None
    for layout in valid_layouts(c):
        changes = {k: getattr(layout.parallel, k) for k in SEARCHED_KEYS
                   if getattr(layout.parallel, k) != getattr(c.parallel, k)}
        p = layout.parallel
        rank = (len(changes), p.tp * p.pp * p.cp, p.zero_stage, p.activation_checkpoint_interval != 0, p.pp, p.cp)
        if best is not None and rank >= best[0]:
            continue
        memory = plan(layout)
        if memory.fits:
            best = (rank, changes, memory)
    return None if best is None else (best[1], best[2])


def _gib(b: float) -> str:
    return f"{b / GiB:9,.2f} GiB"


def print_plan(c: Config) -> MemoryPlan:
    p, par, cl, m = plan(c), c.parallel, c.cluster, c.model
    nodes = math.ceil(cl.num_workers / p.workers_per_node)
    host_mem = "this machine's" if cl.host_mem_gb is None else f"{cl.host_mem_gb:g} GiB"
    ok = lambda fits: "fits" if fits else "does NOT fit"  # noqa: E731
    lines = [
        f"model        {p.params / 1e9:.3f} B parameters ({m.n_layers} layers, dim {m.dim}, "
        f"{m.n_heads} heads / {m.n_kv_heads} KV heads, ffn {m.ffn_dim}, vocab {m.vocab_size})",
        f"layout       {cl.num_workers} GPUs = tp {par.tp} x pp {par.pp} x cp {par.cp} x dp {c.data_parallel_size} on "
        f"{nodes} "
        f"node(s) of {p.workers_per_node} workers; ZeRO-{par.zero_stage}; {c.trainer.precision.value}; micro-batch "
        f"{c.trainer.micro_batch_size} x {c.data.seq_len} tokens, grad accum {c.trainer.grad_accum}",
        f"per rank     {p.params_per_rank / 1e6:,.1f} M parameters held"
        + (f" (ZeRO-3: 1/{c.data_parallel_size * par.cp} of each)" if par.zero_stage >= 3 else "")
        + (f"; context parallel: {c.data.seq_len // par.cp:,} of every {c.data.seq_len:,} tokens"
           if par.cp > 1 else ""),
        "host         per rank at start-up = 4 B x parameters it builds + 4 B x largest full tensor + allowance",
        f"  weights built   {_gib(p.startup_weights)}   its share, fp32 (built on the meta device, only its slice)",
        f"  largest tensor  {_gib(p.startup_largest_tensor)}   {largest_tensor_params(m) / 1e6:,.1f} M parameters, "
        "generated whole, then sliced",
        f"  allowance       {_gib(p.host_overhead)}   cluster.host_overhead_gb (CUDA context, processes, buffers)",
    ]
    if p.offloaded:
        lines.append(f"  offloaded       {_gib(p.offloaded)}   states in training; the built weights moved to the GPU")
    if p.checkpoint_snapshot:
        lines.append(f"  checkpoint copy {_gib(p.checkpoint_snapshot)}   in training: weights + optimizer states an "
                     "asynchronous save copies (trainer.async_checkpoint); kept between saves")
    lines += [
        f"  per rank        {_gib(p.host_per_rank)}"
        + ("   (the larger of start-up and training, + allowance)" if p.host_in_training else ""),
        f"  per node        {_gib(p.host_per_node)}   = {p.workers_per_node} x per rank, of {host_mem} "
        f"(budget {cl.plan_headroom:.0%}: {p.host_budget / GiB:,.1f} GiB)   {ok(p.fits_host)}",
        "training     device memory per GPU (the pipeline stage that needs the most)",
        f"  weights         {_gib(p.weights)}",
        f"  gradients       {_gib(p.gradients)}",
        f"  optimizer       {_gib(p.optimizer)}" + ("   (offloaded to CPU)" if par.offload_optimizer else ""),
        f"  activations     {_gib(p.activations_without_checkpointing)}   without checkpointing",
        f"                  {_gib(p.activations_with_checkpointing)}   with checkpointing "
        f"(every {par.activation_checkpoint_interval or 1} block(s))",
        f"  total           {_gib(p.device_total)}   "
        f"({'checkpointing on' if par.activation_checkpoint_interval else 'checkpointing off'}) of "
        f"{cl.gpu_mem_gb:g} GiB (budget {cl.plan_headroom:.0%}: {p.device_budget / GiB:,.1f} GiB)   "
        f"{ok(p.fits_device)}",
    ]
    if p.fits:
        lines.append(f"verdict      fits (budget: cluster.plan_headroom={cl.plan_headroom:g} of GPU and host memory)")
    else:
        lines.append("verdict      does NOT fit: " + "; ".join(p.problems()))
        suggestion = suggest_layout(c)
        if suggestion is None:
            lines.append(f"             no layout of these {cl.num_workers} GPUs fits (tp, pp, ZeRO stage and "
                         "activation checkpointing searched): lower trainer.micro_batch_size, offload "
                         "(parallel.offload_optimizer), or add GPUs")
        else:
            changes, fit = suggestion
            overrides = " ".join(f"parallel.{k}={v}" for k, v in changes.items())
            lines.append(f"suggestion   {overrides}   (the fewest changes that fit: {fit.device_total / GiB:,.1f} GiB "
                         f"per GPU, {fit.host_per_node / GiB:,.1f} GiB host per node)")
    print("\n".join(lines))
    return p
