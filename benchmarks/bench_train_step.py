"""Training-step speed, measured in one process as medians of interleaved repeats (the machine is noisy):

  (a) distlm's Llama vs transformers' LlamaForCausalLM, same shapes, data and plain loop (AdamW, clipping),
      fp32 and bf16 (autocast), torch.compile of the blocks off and on        -> ratios (target >= 1.15 fp32)
  (b) distlm's achieved training FLOP/s vs this machine's fp32 matmul FLOP/s  -> share (target >= 75 %)
      achieved = (6 N + 12 L d T) FLOPs per token x tokens/s (N non-embedding parameters, L layers, d width,
      T sequence: PaLM appendix B, attention included); matmul = 2 n^3 / seconds of an n x n fp32 matmul
  (c) distlm's step through a DeepSpeed engine (ZeRO-1, 1 rank, the trainer's own `accumulate_and_step`,
      with its loss all-reduce and host read) vs the plain loop, fp32        -> ratio (target >= 0.95)

    python benchmarks/bench_train_step.py [--dim 384 --layers 4 --seq 256 --batch 8 --rounds 5 --threads 2]

Every variant is built and warmed up (compiled) first; then each round times `--steps` steps of every
variant in turn, and a ratio is the median over rounds of the ratio within a round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import join_single_rank_group
from distlm.config import compose_config
from distlm.model.llama import Llama
from distlm.train.worker.engine import compile_blocks


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled variants (they compile for minutes on CPU)")
    p.add_argument("--no-bf16", action="store_true")
    return p.parse_args()


def config(a: argparse.Namespace, device: str, bf16: bool):
    return compose_config(
        f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
        f"model.n_kv_heads={a.kv_heads}", f"model.ffn_dim={a.ffn}", f"model.vocab_size={a.vocab}",
        f"data.seq_len={a.seq}", f"trainer.micro_batch_size={a.batch}", "cluster.num_workers=1",
        f"cluster.use_gpu={device == 'cuda'}", f"trainer.precision={'bf16' if bf16 else 'fp32'}",
        "trainer.max_steps=100000", "optimizer.warmup_steps=1")


def hf_llama(c):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = c.model
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attn_implementation="sdpa"))


def plain_step(model, bf16: bool, device: str, hf: bool, fused: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)  # the trainer's AdamW kernel

    def step(batch):
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if hf:  # HF shifts labels itself: give it the same targets as distlm
                logits = model(input_ids=inputs).logits
                loss = model.loss_function(logits, labels=None, shift_labels=labels.contiguous(),
                                           vocab_size=logits.shape[-1])
            else:
                loss = model(inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def deepspeed_step(c, device: str):
    """The trainer's step: forward, the loss (and control flags) all-reduce read on the host, backward, step."""
    from distlm.parallel.layout import make_layout
    from distlm.train.worker.engine import build_engine
    from distlm.train.worker.step import accumulate_and_step

    join_single_rank_group(use_cuda=device == "cuda")
    torch.manual_seed(0)
    engine = build_engine(c, make_layout(tp=1, pp=1))

    def step(batch):
        batch = batch.to(engine.device)
        pairs = iter([(batch[:, :-1], batch[:, 1:])])
        accumulate_and_step(engine, engine, pairs, 1, lambda: [0.0, 0.0], lambda losses: None)
    return step


def timed(step, batches) -> float:
    """Seconds per step over the batches."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync()
    return (time.perf_counter() - start) / len(batches)


def matmul_step(n: int, device: str):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda _: torch.mm(a, b)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c32 = config(a, device, bf16=False)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device) for _ in range(a.steps)]
    tokens_per_step = a.batch * a.seq
    torch.manual_seed(0)
    probe = Llama(c32.model)
    flops_per_token = probe.flops_per_token(a.seq)
    print(f"model: {probe.num_params() / 1e6:.1f}M params ({probe.num_params(exclude_embedding=True) / 1e6:.1f}M "
          f"non-embedding), dim {a.dim} x {a.layers} layers, batch {a.batch} x {a.seq}, {a.threads} threads, {device}; "
          f"{a.rounds} rounds x {a.steps} steps per variant")
    del probe

    variants = {}  # name -> step function
    for precision in ("fp32",) + (() if a.no_bf16 else ("bf16",)):
        for compiled in (False,) + (() if a.no_compile else (True,)):
            for kind in ("distlm", "transformers"):
                torch.manual_seed(0)
                model = (Llama(c32.model) if kind == "distlm" else hf_llama(c32)).to(device)
                if compiled:
                    compile_blocks(model) if kind == "distlm" else [layer.compile() for layer in model.model.layers]
                name = f"{kind} {precision}{' compiled' if compiled else ''}"
                variants[name] = plain_step(model, precision == "bf16", device, hf=kind == "transformers",
                                            fused=c32.optimizer.fused)
    variants["distlm fp32 DeepSpeed"] = deepspeed_step(c32, device)
    variants["fp32 matmul 2048"] = matmul_step(2048, device)

    for name, step in variants.items():  # warm-up: compilation, allocator, first optimizer step
        start = time.perf_counter()
        timed(step, batches[:1])
        print(f"  warm-up {name:32s} {time.perf_counter() - start:7.1f}s")

    seconds = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, step in variants.items():
            seconds[name].append(timed(step, batches))

    print(f"\n{'variant':34s} {'median tokens/s':>16s}  {'spread (min-max)':>20s}")
    for name, times in seconds.items():
        if "matmul" in name:
            continue
        rates = sorted(tokens_per_step / s for s in times)
        print(f"{name:34s} {statistics.median(rates):16,.0f}  {rates[0]:9,.0f} - {rates[-1]:9,.0f}")

    def ratio(slow: str, fast: str) -> float:  # the median over rounds of the within-round speed ratio
        return statistics.median(s / f for s, f in zip(seconds[slow], seconds[fast]))

    print("\n(a) distlm vs transformers (same precision and compile setting): speed ratio, target >= 1.15 in fp32")
    for name in seconds:
        if name.startswith("distlm") and "DeepSpeed" not in name:
            other = name.replace("distlm", "transformers")
            print(f"    {name:28s} {ratio(other, name):5.2f}x")
    if not a.no_compile:
        both = ratio("transformers fp32", "distlm fp32 compiled")
        print(f"    distlm fp32 compiled vs transformers fp32 eager: {both:5.2f}x")

    matmul_flops = [2 * 2048**3 / s for s in seconds["fp32 matmul 2048"]]
    print(f"\n(b) fp32 matmul (2048^3): {statistics.median(matmul_flops) / 1e9:,.1f} GFLOP/s; distlm training FLOP/s "
          f"({flops_per_token / 1e6:.1f} MFLOP/token) as a share of it, target >= 75 %")
    for name in ("distlm fp32", "distlm fp32 compiled", "distlm fp32 DeepSpeed"):
        if name in seconds:
            shares = [flops_per_token * tokens_per_step / s / m for s, m in zip(seconds[name], matmul_flops)]
            print(f"    {name:28s} {statistics.median(shares):6.1%}")

    print("\n(c) DeepSpeed path (ZeRO-1, the trainer's step) vs the plain loop, fp32 eager, target >= 0.95")
    print(f"    {ratio('distlm fp32', 'distlm fp32 DeepSpeed'):5.2f}x")


if __name__ == "__main__":
    main()
