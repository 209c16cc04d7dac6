"""`distlm plan`: what a model needs per rank and per node under a parallel layout, and whether it fits.

Host memory at start-up (per rank; a node holds cluster.workers_per_node ranks). The model is built on
the meta device and each rank materializes only its own slice of each parameter, in fp32, one tensor at
a time (the full tensor is generated from a seed of its name and sliced), so a rank's peak is
    4 B x the parameters it holds (its TP slice of its pipeline stage; / dp under ZeRO-3)
  + 4 B x the largest full tensor of the model
  + cluster.host_overhead_gb (the worker process: torch, DeepSpeed, Ray; CUDA context, pinned buffers)
DeepSpeed casts the built weights to bf16 and moves them to the GPU before it creates the optimizer, so
offloaded optimizer states (16 B per parameter of the rank's ZeRO shard: fp32 weights, gradients, Adam
m and v; + the 16-bit weights under parameter offload) replace, not add to, the built weights. In training,
an asynchronous checkpoint (trainer.async_checkpoint) copies the states the rank writes to host memory: its
weights (16-bit or fp32; none in ZeRO-3's model file) + 12 B per parameter of its optimizer shard (fp32 master,
Adam m, v); the buffers are kept from one save to the next (checkpoint_snapshot_bytes).

Memory in a training step, per rank of each pipeline stage, phase by phase: what DeepSpeed 0.19.8 really holds as
distlm configures it (train/worker/engine.py): the rank's weights, gradients, fp32 master weights and Adam moments
under each ZeRO stage, ZeRO's buffers (reduce buckets, ZeRO-3's gathered, prefetched and reused parameters, optimizer
sub-groups: conf's parallel.reduce_bucket_blocks and parallel.zero3_*), the optimizer step's temporaries, and the
activations below; contiguous gradients on GPUs only, torch's fused AdamW, and distlm's ZeRO-3 correction
(compat/deepspeed.py: in fp32 the master partition is the weight partition). It is device memory on GPUs
(cluster.use_gpu); on CPU ranks (gloo, fp32 by default) it is host memory, so there the host check covers training
as well as start-up. A node's host memory is the sum over its ranks (each rank's pipeline stage). Symbols, for one rank:

    n   elements it holds: its tensor-parallel slice of its pipeline stage (ZeRO-3: of the whole model)
    d   ZeRO's partition group: data x context ranks; ZeRO-3 holds n/d of every parameter
    w   bytes of a weight and of a gradient element: 4 in fp32, 2 in bf16 (fp32 master weights and Adam's m, v
        are 4 B each in both)
    A   activations saved for backward at the stage's peak (stage_activation_bytes: a pipeline stage holds
        its micro-batches in flight, m of them, and their input and output buffers)
    P   its largest parameter (the embedding or head, TP-sliced); Q the largest other one (an MLP matrix)
    b   the reduce bucket: max(reduce_bucket_blocks x a block's parameters, the largest parameter it reduces), <= n
    s   ZeRO-3's optimizer sub-group: min(zero3_sub_group_blocks x a block, n/d)
    L   ZeRO-3: the largest module, gathered whole (the embedding, or the head)

Between steps (from the second on: Adam's moments exist after the first update) a rank holds its weights, the
fp32 master partition (ZeRO-1/2 keep one even in fp32 training; bf16 always does), the gradients kept between
steps, Adam's m and v of its partition, and F, DeepSpeed's fixed state on a CPU rank. Each phase adds what it
needs at its peak:

ZeRO-0      held  w n + 8 n (+ bf16: 4 n master, 4 n fp32 gradients)
            forward   A (+ w n gradients of earlier micro-batches, with gradient accumulation in fp32)
            backward  w n gradients + DeepSpeed's all-reduce flattens them in one copy of up to 5e8 elements
            step      the gradients (freed after it)
ZeRO-1      held  w n + 12 n/d
            forward   A (+ w n gradients of earlier micro-batches, with gradient accumulation)
            backward  w n gradients + the flattened copy of one reduce bucket (CPU; GPUs reduce in place), or,
                      in a pipeline, w n gradients + the activations of the other (m - 1) micro-batches in flight
            step      the rank's gradient partition flattened next to its source (2 w n/d, + 4 n/d in fp32 for
                      bf16), or gloo's temporary copy of the whole flat weights in the all-gather that follows
                      (w n, when d > 1)
ZeRO-2      held  w n + 12 n/d
            backward  the gradient partition (w n/d) + the larger of: A + the bucket's gradients and their flattened
                      copy (2 w b), and the embedding's whole gradient at the end (w P; tied: 3 w P)
            step      as ZeRO-1
ZeRO-3      held  w n/d + 4 n/d master (bf16 only) + w n/d gradient partition + 8 n/d + (GPU) w b bucket
            forward   A + the module gathered whole (w L) + gloo's all-gather copy (w L) + prefetched and reused
                      parameters (w x prefetch, w x min(reuse distance / 2, N))
            backward  the larger of: A + a tied weight's whole gradient (w L, it lives all backward) + the bucket
                      of whole gradients, the interleaved copy reduce-scatter makes and gloo's (3 w b; GPUs: w b);
                      and the end of backward: the embedding gathered (w L), its whole gradient (w L) and the tied
                      one (w L)
            step      one sub-group's gradients as fp32 (4 s)

gloo's collectives on CPU tensors copy their input (reduce-scatter 1x, all-gather 1x the output); NCCL's do not.
Measured against each rank's peak RSS: tests/test_train_memory.py, benchmarks/bench_train_memory.py (docs/scale.md,
"Training memory"). The GPU terms follow the same code paths; tests/test_gpu.py checks them where a GPU is lent.

Activations: the bytes autograd saves for backward, per token, b = bytes of the activation dtype
(tests/test_plan_activations.py counts them in a real forward pass). Per block:
    two RMSNorms: fp32 input (the input itself in fp32), normalized, scaled output   2 * (4 + 2b) * dim
                  and their fp32 1/rms                                                2 * 4
    split by TP: q and k after RoPE, v, attention output                             b * (2 dim + 2 kv_dim) / tp
                 and SDPA's fp32 log-sum-exp (no seq x seq scores)                    4 * n_heads / tp
    split by TP: gate, silu(gate), up, silu(gate) * up                                4 * b * ffn_dim / tp
    a sparse block (model.moe, top_k = k experts of ffn f each) instead of the MLP, for the k (token, expert)
    pairs of each token that reach this rank's experts (1/tp of them on average):
           the token's input, the SwiGLU activations and the expert's output              b * k * (4 f + 2 dim) / tp
           and the pairs' fp32 weights and int64 token indices                           12 * k / tp
    and for every token: the router's fp32 logits and probabilities, their logsumexp and
    the top-k's sum, top-k values and int64 indices, the sort order and its inverse       8 * experts + 8 + 28 * k
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
from dataclasses import dataclass, field

from distlm.config import Config, ModelConfig, Precision, describe_layout, raise_if
from distlm.parallel.sequence import kv_replication
from distlm.parallel.tensor import padded_vocab_size
from distlm.validation import node_placement_problems, validate_cluster, validate_layout

GiB = 2**30
FP32 = 4  # bytes: start-up builds every weight in fp32


def is_sparse(m: ModelConfig, layer: int) -> bool:
    return m.moe is not None and m.moe.is_sparse(layer)


def expert_params(m: ModelConfig) -> int:
    """One sparse block's experts (SwiGLU's three matrices each)."""
    return 3 * m.dim * m.moe.experts * m.moe.expert_ffn_dim


def block_params(m: ModelConfig, layer: int = 0) -> int:
    kv_dim = m.n_kv_heads * m.head_dim
    attention = m.dim * m.n_heads * m.head_dim * 2 + m.dim * kv_dim * 2  # q, o and k, v
    mlp = expert_params(m) + m.dim * m.moe.experts if is_sparse(m, layer) else 3 * m.dim * m.ffn_dim  # (+ router)
    return attention + mlp + 2 * m.dim  # two norms


def total_params(m: ModelConfig) -> int:
    embeddings = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    return sum(block_params(m, i) for i in range(m.n_layers)) + embeddings + m.dim


def active_params(m: ModelConfig) -> int:
    """The parameters one token uses: top_k of each sparse block's experts."""
    sparse = sum(is_sparse(m, i) for i in range(m.n_layers))
    return total_params(m) - (sparse and sparse * expert_params(m) * (m.moe.experts - m.moe.top_k) // m.moe.experts)


def largest_tensor_params(m: ModelConfig) -> int:
    """The largest single weight, whole: the embedding (or head), an MLP matrix or a sparse block's experts."""
    experts = m.moe.experts * m.moe.expert_ffn_dim * m.dim if m.moe else 0
    return max(m.vocab_size * m.dim, m.ffn_dim * m.dim, m.n_heads * m.head_dim * m.dim, experts)


def stage_blocks(n_layers: int, pp: int) -> list[int]:
    """Blocks per pipeline stage, as an even split gives them (the first stages take the remainder)."""
    return [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]


def stage_params(m: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage (its TP slice)."""
    vocab_rows = padded_vocab_size(m.vocab_size, tp) // tp
    per_stage, first_block = [], 0
    for s, blocks in enumerate(stage_blocks(m.n_layers, pp)):
        n = sum(block_params(m, i) for i in range(first_block, first_block + blocks)) // tp
        first_block += blocks
        if s == 0:
            n += vocab_rows * m.dim
        if s == pp - 1:
            n += m.dim + (vocab_rows * m.dim if (not m.tie_embeddings or pp > 1) else 0)
        per_stage.append(n)
    return per_stage


def rank_params(m: ModelConfig, tp: int, pp: int) -> int:
    """Parameters held by one rank of the heaviest pipeline stage."""
    return max(stage_params(m, tp, pp))


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
    if m.moe:  # the larger of a dense and a sparse block's (see the module docstring)
        k, f = m.moe.top_k, m.moe.expert_ffn_dim
        sparse = (dtype_b * k * (4 * f + 2 * m.dim) + 12 * k) / tp + 8 * m.moe.experts + 8 + 28 * k
        mlp = max(mlp, sparse) if m.moe.every > 1 else sparse
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


# ---------------------------------------------------------------- memory in a training step

MiB = 2**20
ADAM = 8  # m and v, fp32
# DeepSpeed's state on a CPU rank beyond the tensors above, once its engine exists (its optimizer, hooks, gloo
# buffers): measured ~130 MiB above a bare process at every model size tried (benchmarks/bench_train_memory.py).
CPU_FIXED = 130 * MiB
# ZeRO-0 all-reduces gradients in buckets of DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (engine.py), not reduce_bucket_size.
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000


@dataclass(frozen=True)
class ZeroBuffers:
    """ZeRO's buffer sizes in elements, as DeepSpeed gets them (conf gives them in blocks' worth of parameters)."""
    reduce_bucket: int
    prefetch: int
    max_live: int
    reuse_distance: int
    sub_group: int


@dataclass(frozen=True)
class RankShape:
    """What the arithmetic needs to know of one rank (rank_shapes derives it from the config)."""
    params: int             # n: elements of its TP slice of its pipeline stage (ZeRO-3: of the model)
    partition: int          # d: ZeRO's partition group (data x context ranks)
    zero_stage: int
    weight_bytes: int       # w
    activations: float      # A
    in_flight: int          # m: micro-batches a pipeline stage holds at once (1 without a pipeline)
    accumulating: bool      # several micro-batches per step outside a pipeline: their gradients wait through forwards
    largest: int            # P (ZeRO-3: L)
    largest_other: int      # Q: the largest parameter other than the embedding and head
    tied: bool              # ZeRO-3: one weight is embedding and head
    buffers: ZeroBuffers
    gloo: bool              # CPU ranks: collectives copy, the memory is host memory, DeepSpeed's fixed state counts
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class StepMemory:
    """One rank's memory in a training step: what it holds between steps, and on top of that, what each phase
    (forward, backward, optimizer step) needs at its peak. Terms are named for what they are."""
    held: dict[str, float]
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def total(self, phase: str) -> float:
        return sum(self.held.values()) + sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    def term(self, name: str) -> float:
        """A named term where it is largest (held, or in any phase)."""
        return max([self.held.get(name, 0.0)] + [p.get(name, 0.0) for p in self.phases.values()])


def step_memory(r: RankShape) -> StepMemory:
    if r.zero_stage >= 3:
        return _zero3(r)
    return _zero012(r)


def _flattened(r: RankShape) -> int:
    """Elements of one flattened reduce bucket: DeepSpeed closes a bucket before the next gradient would overflow it,
    and a gradient larger than the bucket (the embedding, the head) is reduced alone, as a view (no copy)."""
    return min(r.buffers.reduce_bucket, r.params)


def _largest(*options: dict[str, float]) -> dict[str, float]:
    """Of terms that cannot coexist, the set that needs the most."""
    return max(options, key=lambda terms: sum(terms.values()))


def _zero012(r: RankShape) -> StepMemory:
    n, d, w, z, P = r.params, r.partition, r.weight_bytes, r.zero_stage, r.largest
    mixed = w < FP32
    fixed = {"DeepSpeed's fixed state": CPU_FIXED} if r.gloo else {}
    others = {"activations of the other micro-batches": r.activations * (r.in_flight - 1) / r.in_flight}
    # autograd adds the embedding's gradient to the head's, which waited all backward: both and their sum exist
    tied = {"tied weight's gradient, 3 copies": 3 * w * P} if r.tied else {}
    if z == 0:
        # DeepSpeed all-reduces the gradients in flat copies of up to 5e8 elements, on any backend
        flat = {"all-reduce's flattened copy": FP32 * min(ZERO0_ALLREDUCE_ELEMENTS, n)}
        if mixed:  # DeepSpeed's BF16_Optimizer: fp32 gradients kept flat, fp32 master and Adam partitioned
            held = {"weights": w * n, "16-bit gradients": w * n, "fp32 gradients": FP32 * n,
                    "fp32 master partition": FP32 * n / d, "Adam m, v": ADAM * n / d}
            backward = _largest(flat, others)
            step = {"gradient norm's fp64 copy of the partition": 8 * n / d,
                    **({"gloo's copy of the weights in the all-gather": w * n} if r.gloo and d > 1 else {})}
        else:  # torch's AdamW steps the weights themselves
            held = {"weights": w * n, "Adam m, v": ADAM * n}
            backward = {"gradients": w * n, **_largest(flat, others)}
            step = {"gradients": w * n}
        forward = {"activations": r.activations, **({"gradients of earlier micro-batches": w * n}
                                                     if r.accumulating and not mixed else {})}
        phases = {"forward": forward, "backward": backward, "optimizer step": step}
        return StepMemory({**held, **fixed}, phases)
    held = {"weights": w * n, "fp32 master partition": FP32 * n / d, "Adam m, v": ADAM * n / d}
    if r.offload_optimizer:  # host memory: plan.offloaded_host_bytes
        del held["fp32 master partition"], held["Adam m, v"]
    bucket = w * _flattened(r)
    partition = {"gradient partition": w * n / d}
    if z == 1:  # every gradient is kept until the step, then reduced bucket by bucket
        if r.gloo:  # each bucket is flattened into one copy, all-reduced, copied back
            reduce = {"reduce bucket, flattened": bucket}
        else:  # copied into the contiguous bucket, all-reduced in place, the partition's part kept flat
            reduce = {"reduce bucket (contiguous)": w * r.buffers.reduce_bucket, **partition}
        backward = {"gradients": w * n, **_largest(reduce, others, {"tied weight's gradient, 2 more copies":
                                                                        2 * w * P} if r.tied else {})}
    else:  # gradients are reduced as backward makes them; the rank keeps its partition
        during = {"activations": r.activations, "reduce bucket: gradients and their flattened copy": 2 * bucket}
        if not r.gloo:
            during["reduce bucket: gradients and their flattened copy"] = 2 * w * r.buffers.reduce_bucket
        if r.tied:
            during["tied weight's gradient"] = w * P
        end = tied or {"embedding's gradient": w * P}
        backward = {**partition, **_largest(during, end)}
    flattened = {"gradient partition and its flat copy": 2 * w * n / d + (FP32 * n / d if mixed else 0)}
    gather = {"gloo's copy of the weights in the all-gather": w * n} if r.gloo and d > 1 else {}
    norm = {**partition, "gradient norm's fp64 copy of the largest gradient": 8 * P}
    # gradient accumulation: ZeRO-1 keeps every gradient until the step (ZeRO-2's partition: no more, measured)
    kept = {"gradients of earlier micro-batches": w * n} if r.accumulating and z == 1 else {}
    phases = {"forward": {"activations": r.activations, **kept}, "backward": backward,
              "optimizer step": _largest(flattened, gather, norm)}
    return StepMemory({**held, **fixed}, phases)


def _zero3(r: RankShape) -> StepMemory:
    n, d, w, b = r.params, r.partition, r.weight_bytes, r.buffers
    part = n / d
    mixed = w < FP32
    held = {"weight partition": w * part, "gradient partition": w * part, "Adam m, v": ADAM * part}
    if mixed:
        held["fp32 master partition"] = FP32 * part
    if r.offload_optimizer:
        for key in ("gradient partition", "Adam m, v", "fp32 master partition"):
            held.pop(key, None)
    if r.offload_params:
        held.pop("weight partition")
    bucket = min(max(b.reduce_bucket, r.largest_other), n)  # at least one whole gradient
    if r.gloo:
        held["DeepSpeed's fixed state"] = CPU_FIXED
    else:
        held["reduce bucket (contiguous)"] = w * b.reduce_bucket
    copies = 2 if r.gloo else 1  # the gathered module, and gloo's all-gather output copy
    forward = {"activations": r.activations, "largest module, gathered": copies * w * r.largest,
               "prefetched parameters": w * min(b.prefetch, b.max_live),
               "parameters kept for reuse": w * min(b.reuse_distance / 2, n)}
    # the bucket's whole gradients, reduce-scatter's interleaved copy and gloo's copy of it (GPUs: reduced in place)
    reduce = ({"reduce bucket: gradients, interleaved copy, gloo's copy": 3 * w * bucket} if r.gloo
              else {"reduce bucket's gradients": w * bucket})
    if r.tied:  # the head's gradient waits for the embedding's, all backward
        during = {"activations": r.activations, "tied weight's gradient": w * r.largest, **reduce}
    else:  # the head's gradient is reduced first, alone
        during = {"activations": r.activations,
                  **_largest(reduce, {"head's gradient and its reduce-scatter copy": 2 * w * r.largest})}
    end = {"embedding gathered and its gradient": 2 * w * r.largest,
           **({"tied weight's gradient": w * r.largest} if r.tied else {})}
    backward = _largest(during, end)
    step = _largest({"sub-group gradients in fp32": FP32 * min(b.sub_group, part)},
                    {"gradient norm's fp64 copy of the largest partition": 8 * r.largest / d})
    return StepMemory(held, {"forward": forward, "backward": backward, "optimizer step": step})


def zero_buffers(c: Config) -> ZeroBuffers:
    """ZeRO's buffers in elements: conf's blocks' worth times the parameters of one block of a rank's TP slice."""
    par = c.parallel
    m = c.model
    block = sum(block_params(m, i) for i in range(m.n_layers)) / m.n_layers / par.tp  # (dense and sparse blocks)
    count = lambda blocks: int(blocks * block)  # noqa: E731
    return ZeroBuffers(reduce_bucket=max(1, count(par.reduce_bucket_blocks)), prefetch=count(par.zero3_prefetch_blocks),
                       max_live=count(par.zero3_max_live_blocks), reuse_distance=count(par.zero3_reuse_distance_blocks),
                       sub_group=max(1, count(par.zero3_sub_group_blocks)))


def rank_shapes(c: Config) -> list[RankShape]:
    """One rank of each pipeline stage, as the training-step arithmetic needs it."""
    m, par, t = c.model, c.parallel, c.trainer
    w = 2 if t.precision == Precision.bf16 else 4
    acts = stage_activation_bytes(c, par.activation_checkpoint_interval)
    vocab = padded_vocab_size(m.vocab_size, par.tp) // par.tp * m.dim
    experts = m.moe.experts * m.moe.expert_ffn_dim * m.dim if m.moe else 0  # a sparse block's experts, one tensor
    other = max(m.ffn_dim * m.dim, m.n_heads * m.head_dim * m.dim, experts) // par.tp  # an MLP or attention matrix
    buffers = zero_buffers(c)
    shapes = []
    for s, n in enumerate(stage_params(m, par.tp, par.pp)):
        holds_vocab = s == 0 or s == par.pp - 1
        shapes.append(RankShape(
            params=n, partition=c.data_parallel_size * par.cp, zero_stage=par.zero_stage, weight_bytes=w,
            activations=acts[s], in_flight=min(par.pp - s, t.grad_accum) if par.pp > 1 else 1,
            accumulating=t.grad_accum > 1 and par.pp == 1,
            largest=max(vocab, other) if holds_vocab else other, largest_other=other,
            tied=m.tie_embeddings and par.pp == 1, buffers=buffers, gloo=not c.cluster.use_gpu,
            offload_optimizer=par.offload_optimizer, offload_params=par.offload_params))
    return shapes


def heaviest_node_bytes(per_stage: list[float], world: int, pp: int, per_node: int) -> float:
    """The most any node holds: the sum over its ranks. Ray Train numbers ranks node by node and DeepSpeed's grid
    puts the pipeline axis first (parallel/layout.py), so rank r runs stage r // (world / pp)."""
    ranks = [per_stage[r // (world // pp)] for r in range(world)]
    return max(sum(ranks[i:i + per_node]) for i in range(0, world, per_node))


@dataclass
class MemoryPlan:
    params: int
    params_per_rank: int         # held by one rank of the heaviest stage (before ZeRO-3's split)
    on_gpu: bool                 # training states in device memory; on CPU ranks they are host memory
    training: list[StepMemory]   # one rank of each pipeline stage in a training step
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    device_budget: float         # plan_headroom x gpu_mem_gb
    # host, per rank of the heaviest stage
    startup_weights: float       # its share of the fp32 weights, as they are built
    startup_largest_tensor: float
    offloaded: float             # offloaded optimizer states (and parameters) in training
    checkpoint_snapshot: float   # trainer.async_checkpoint: its model + optimizer states, copied while a save is written
    host_overhead: float
    host_per_stage: list[float]  # one rank of each pipeline stage: the larger of start-up and training, + allowance
    host_per_rank: float         # the rank that needs the most
    workers_per_node: int
    host_per_node: float         # the node that needs the most: the sum of its ranks
    host_budget: float           # plan_headroom x host_mem_gb, per node

    @property
    def heaviest(self) -> StepMemory:
        """The pipeline stage whose rank needs the most in training."""
        return max(self.training, key=lambda t: t.peak)

    @property
    def training_peak(self) -> float:
        return self.heaviest.peak

    @property
    def startup_peak(self) -> float:
        return self.startup_weights + self.startup_largest_tensor

    @property
    def device_total(self) -> float:
        return self.training_peak if self.on_gpu else 0.0

    # the heaviest rank's terms, by kind (gpu_check.py, tests/test_gpu.py)
    @property
    def weights(self) -> float:
        return sum(v for k, v in self.heaviest.held.items() if "weight" in k or "master" in k)

    @property
    def gradients(self) -> float:
        return sum(v for k, v in self.heaviest.held.items() if "gradient" in k)

    @property
    def optimizer(self) -> float:
        return self.heaviest.held.get("Adam m, v", 0.0)

    @property
    def activations(self) -> float:
        return self.heaviest.term("activations")

    @property
    def fits_device(self) -> bool:
        return not self.on_gpu or self.device_total <= self.device_budget

    @property
    def fits_host(self) -> bool:
        return self.host_per_node <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def problems(self) -> list[str]:
        """What does not fit, each naming the memory, the phase, the need, the budget and the largest terms."""
        p = []
        if not self.fits_host:
            if not self.on_gpu and self.training_peak > self.startup_peak:
                when = f"in training ({self.heaviest.peak_phase}: {largest_terms(self.heaviest)})"
            elif self.offloaded + self.checkpoint_snapshot > self.startup_peak:
                when = "in training (offloaded states" + (" and an asynchronous checkpoint's copy: "
                                                          "trainer.async_checkpoint=false saves without it"
                                                          if self.checkpoint_snapshot else "") + ")"
            else:
                when = "at start-up"
            p.append(f"host memory {when}: {self.host_per_node / GiB:,.1f} GiB per node "
                     f"> {self.host_budget / GiB:,.1f} GiB budget")
        if not self.fits_device:
            p.append(f"device memory in training ({self.heaviest.peak_phase}: {largest_terms(self.heaviest)}): "
                     f"{self.device_total / GiB:,.1f} GiB per GPU > {self.device_budget / GiB:,.1f} GiB budget")
        return p


def largest_terms(t: StepMemory, count: int = 3) -> str:
    """The largest terms of a rank's peak, e.g. "activations 3.2 GiB, Adam m, v 1.4 GiB, weights 0.7 GiB"."""
    terms = {**t.held}
    for name, value in t.phases[t.peak_phase].items():
        terms[name] = terms.get(name, 0.0) + value
    top = sorted(terms.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{name} {value / GiB:,.2f} GiB" for name, value in top)


def plan(c: Config) -> MemoryPlan:
    m, par, cl = c.model, c.parallel, c.cluster
    raise_if(validate_layout(c) + validate_cluster(c))
    # ZeRO partitions over the data x context ranks (parallel/layout.py): they all hold the same parameters.
    dp, mixed = c.data_parallel_size * par.cp, c.trainer.precision == Precision.bf16
    interval = par.activation_checkpoint_interval
    training = [step_memory(shape) for shape in rank_shapes(c)]
    per_stage = stage_params(m, par.tp, par.pp)
    overhead = cl.host_overhead_gb * GiB
    largest = FP32 * largest_tensor_params(m)
    host = []  # per stage: the larger of start-up and training (CPU: the step; GPU: offloaded states), + allowance
    for n, step in zip(per_stage, training):
        built = FP32 * (n / dp if par.zero_stage >= 3 else n)  # ZeRO-3 partitions each parameter as it is built
        in_training = offloaded_host_bytes(n, dp, par.zero_stage, mixed, par.offload_optimizer, par.offload_params)
        if c.trainer.async_checkpoint:
            in_training += checkpoint_snapshot_bytes(n, dp, par.zero_stage, mixed)
        if not cl.use_gpu:
            in_training += step.peak
        host.append(max(built + largest, in_training) + overhead)
    n_rank = rank_params(m, par.tp, par.pp)
    per_node = node_workers(c)
    return MemoryPlan(
        params=total_params(m), params_per_rank=n_rank, on_gpu=cl.use_gpu, training=training,
        activations_without_checkpointing=max(stage_activation_bytes(c, 0)),
        activations_with_checkpointing=max(stage_activation_bytes(c, interval or 1)),
        device_budget=cl.plan_headroom * cl.gpu_mem_gb * GiB,
        startup_weights=FP32 * (n_rank / dp if par.zero_stage >= 3 else n_rank), startup_largest_tensor=largest,
        offloaded=offloaded_host_bytes(n_rank, dp, par.zero_stage, mixed, par.offload_optimizer, par.offload_params),
        checkpoint_snapshot=checkpoint_snapshot_bytes(n_rank, dp, par.zero_stage, mixed)
        if c.trainer.async_checkpoint else 0.0,
        host_overhead=overhead, host_per_stage=host, host_per_rank=max(host), workers_per_node=per_node,
        host_per_node=heaviest_node_bytes(host, cl.num_workers, par.pp, per_node),
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
    parallelism (tp x pp x cp), the lowest ZeRO stage, no recomputation, fewer pipeline stages, then context
    rather than tensor parallelism (it divides every activation, TP leaves norms and residuals whole). None if
    nothing fits."""
    best = None
    for layout in valid_layouts(c):
        changes = {k: getattr(layout.parallel, k) for k in SEARCHED_KEYS
                   if getattr(layout.parallel, k) != getattr(c.parallel, k)}
        p = layout.parallel
        rank = (len(changes), p.tp * p.pp * p.cp, p.zero_stage, p.activation_checkpoint_interval != 0, p.pp, p.tp)
        if best is not None and rank >= best[0]:
            continue
        memory = plan(layout)
        if memory.fits:
            best = (rank, changes, memory)
    return None if best is None else (best[1], best[2])


def _expert_share(m: ModelConfig, tp: int) -> str:
    """Which experts a rank of a TP group of `tp` holds, and their parameters per sparse block."""
    e, params = m.moe.experts, expert_params(m) // tp
    if tp == 1:
        return f"all {e} on every rank, {params / 1e6:,.1f} M parameters per sparse block (parallel.tp splits them)"
    held = f"{e // tp} of {e}" if e % tp == 0 else f"1/{tp // e} of one"
    # expert parallelism is the TP group's: tokens stay, the block ends in the all-reduce a dense block has too
    return f"{held} per rank (expert parallelism = tp: no all-to-all), {params / 1e6:,.1f} M parameters per sparse block"


def _gib(b: float) -> str:
    return f"{b / GiB:9,.2f} GiB"


def _terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{name} {value / GiB:,.2f}" for name, value in terms.items() if value)


def verdict(c: Config, p: MemoryPlan) -> list[str]:
    """The verdict lines: fits, or what does not fit and the layout of the same GPUs (or processes) that would."""
    cl = c.cluster
    if p.fits:
        return [f"verdict      fits (budget: cluster.plan_headroom={cl.plan_headroom:g} of "
                f"{'GPU and host' if p.on_gpu else 'host'} memory)"]
    lines = ["verdict      does NOT fit: " + "; ".join(p.problems())]
    suggestion = suggest_layout(c)
    if suggestion is None:
        lines.append(f"             no layout of these {cl.num_workers} workers fits (tp, pp, cp, ZeRO stage and "
                     "activation checkpointing searched): lower trainer.micro_batch_size, offload "
                     "(parallel.offload_optimizer), or add workers")
    else:
        changes, fit = suggestion
        overrides = " ".join(f"parallel.{k}={v}" for k, v in changes.items())
        per_gpu = f"{fit.device_total / GiB:,.1f} GiB per GPU, " if fit.on_gpu else ""
        lines.append(f"suggestion   {overrides}   (the fewest changes that fit: {per_gpu}"
                     f"{fit.host_per_node / GiB:,.1f} GiB host per node)")
    return lines


def print_plan(c: Config) -> MemoryPlan:
    p, par, cl, m = plan(c), c.parallel, c.cluster, c.model
    nodes = math.ceil(cl.num_workers / p.workers_per_node)
    host_mem = "this machine's" if cl.host_mem_gb is None else f"{cl.host_mem_gb:g} GiB"
    ok = lambda fits: "fits" if fits else "does NOT fit"  # noqa: E731
    t = p.heaviest
    stage = f" (pipeline stage {p.training.index(t)}, the one that needs the most)" if par.pp > 1 else ""
    lines = [
        f"model        {p.params / 1e9:.3f} B parameters ({m.n_layers} layers, dim {m.dim}, "
        f"{m.n_heads} heads / {m.n_kv_heads} KV heads, "
        + (f"top-{m.moe.top_k} of {m.moe.experts} experts of ffn {m.moe.expert_ffn_dim} every {m.moe.every} "
           f"layer(s): {active_params(m) / 1e9:.3f} B active per token, " if m.moe else f"ffn {m.ffn_dim}, ")
        + f"vocab {m.vocab_size})",
        f"layout       {cl.num_workers} {'GPUs' if p.on_gpu else 'CPU processes'} = "
        f"{describe_layout(par.tp, par.pp, par.cp, c.data_parallel_size)} on {nodes} node(s) of "
        f"{p.workers_per_node} workers; ZeRO-{par.zero_stage}; {c.trainer.precision.value}; micro-batch "
        f"{c.trainer.micro_batch_size} x {c.data.seq_len} tokens, grad accum {c.trainer.grad_accum}",
        f"per rank     {p.params_per_rank / 1e6:,.1f} M parameters held"
        + (f" (ZeRO-3: 1/{c.data_parallel_size * par.cp} of each)" if par.zero_stage >= 3 else "")
        + (f"; context parallel: {c.data.seq_len // par.cp:,} of every {c.data.seq_len:,} tokens"
           if par.cp > 1 else "")
        + (f"; experts: {_expert_share(m, par.tp)}" if m.moe else ""),
        "start-up     host memory per rank = 4 B x parameters it builds + 4 B x largest full tensor",
        f"  weights built   {_gib(p.startup_weights)}   its share, fp32 (built on the meta device, only its slice)",
        f"  largest tensor  {_gib(p.startup_largest_tensor)}   {largest_tensor_params(m) / 1e6:,.1f} M parameters, "
        "generated whole, then sliced",
        f"training     {'device memory per GPU' if p.on_gpu else 'host memory per rank (CPU ranks hold their training states in host memory)'}"
        f"{stage}, in a step from the second on (Adam's moments exist)",
        f"  held            {_gib(sum(t.held.values()))}   {_terms(t.held)}",
    ]
    for phase in t.phases:
        lines.append(f"  {phase:15} {_gib(t.total(phase))}   held + {_terms(t.phases[phase]) or 'nothing'}")
    if par.pp > 1:
        lines.append("  per stage       " + ", ".join(f"{s.peak / GiB:,.2f}" for s in p.training) + " GiB at their peaks")
    lines += [
        f"  activations     {_gib(p.activations_without_checkpointing)}   without checkpointing",
        f"                  {_gib(p.activations_with_checkpointing)}   with checkpointing "
        f"(every {par.activation_checkpoint_interval or 1} block(s))",
    ]
    if p.on_gpu:
        lines.append(f"  peak            {_gib(p.device_total)}   in the {t.peak_phase}, of {cl.gpu_mem_gb:g} GiB (budget "
                     f"{cl.plan_headroom:.0%}: {p.device_budget / GiB:,.1f} GiB)   {ok(p.fits_device)}")
    else:
        lines.append(f"  peak            {_gib(t.peak)}   in the {t.peak_phase}")
    lines.append(f"host         per rank: the larger of start-up and training{' (offloaded states)' if p.on_gpu else ''}"
                 " + allowance")
    if p.offloaded:
        lines.append(f"  offloaded       {_gib(p.offloaded)}   states in training; the built weights moved to the GPU")
    if p.checkpoint_snapshot:
        lines.append(f"  checkpoint copy {_gib(p.checkpoint_snapshot)}   in training: weights + optimizer states an "
                     "asynchronous save copies (trainer.async_checkpoint); kept between saves")
    lines += [
        f"  allowance       {_gib(p.host_overhead)}   cluster.host_overhead_gb (the worker process{', CUDA context' if p.on_gpu else ''}, buffers)",
        f"  per rank        {_gib(p.host_per_rank)}   the rank that needs the most",
        f"  per node        {_gib(p.host_per_node)}   {p.workers_per_node} ranks, of {host_mem} "
        f"(budget {cl.plan_headroom:.0%}: {p.host_budget / GiB:,.1f} GiB)   {ok(p.fits_host)}",
    ]
    print("\n".join(lines + verdict(c, p)))
    return p
