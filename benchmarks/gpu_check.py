"""One-GPU check of distlm's training speed and memory (run by benchmarks/gpu_check.sh; <= 8 minutes on an
H100/H200): a ~1.3B Llama (conf/model/1.3b.yaml, 32k vocabulary, 2048-token sequences) in bf16 (the GPU default,
`trainer.precision=auto`) through the DeepSpeed engine and the trainer's own step (`accumulate_and_step`),
with torch.compile of the blocks off, then on.

For each it prints tokens/s per GPU, MFU and the peak GPU memory next to `distlm plan`'s estimate:
    MFU = flops_per_token x tokens/s / dense bf16 peak of the GPU
    flops_per_token = 6 N + 12 L d T    (N non-embedding parameters, L layers, d width, T sequence length:
                                         forward + backward matmuls with attention, PaLM appendix B)
    dense bf16 peak: H100 SXM / H200 989 TFLOP/s (not the 1979 "with sparsity" figure); distlm.train.worker.metrics
On CUDA the timed steps run inside `sdpa_kernel(FLASH_ATTENTION)`, so the flash path is proven taken; where it
is not available the variant runs again with SDPA's own choice and says so. A variant that fails (compilation,
memory) prints its error and the others still run: one GPU session is enough for every number it can give.

    python benchmarks/gpu_check.py                  # on a GPU
    python benchmarks/gpu_check.py --tiny           # on CPU: model=test, a few steps, to prove it runs end to end
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import time

import torch

from distlm.config import compose_config
from distlm.model.llama import Llama
from distlm.parallel.layout import make_layout
from distlm.plan import GiB, plan
from distlm.train.worker.engine import build_engine, compile_blocks, compile_seconds
from distlm.train.worker.metrics import peak_tflops_of
from distlm.train.worker.step import accumulate_and_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="model=test on CPU, a few steps: proves the script runs")
    p.add_argument("--model", default="1.3b", help="a conf/model option")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    return p.parse_args()


def init_single_rank(use_cuda: bool) -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")


def main() -> None:
    a = parse_args()
    use_cuda = torch.cuda.is_available() and not a.tiny
    if a.tiny:
        a.model, a.seq, a.vocab, a.micro_batch, a.warmup, a.steps = "test", 64, 512, 2, 1, 3
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GiB if use_cuda else 80
    c = compose_config(f"model={a.model}", f"data.seq_len={a.seq}", f"data.tokenizer.vocab_size={a.vocab}",
                       f"trainer.micro_batch_size={a.micro_batch}", "cluster.num_workers=1",
                       f"cluster.use_gpu={use_cuda}", f"cluster.gpu_mem_gb={gpu_gb:.1f}",
                       f"parallel.zero_stage={a.zero_stage}", "trainer.max_steps=100000", "optimizer.warmup_steps=10")
    torch.set_float32_matmul_precision("high" if c.trainer.tf32 else "highest")
    init_single_rank(use_cuda)
    device_name = torch.cuda.get_device_name() if use_cuda else "cpu"
    peak = (peak_tflops_of(device_name) or 0) * 1e12 if use_cuda else 0
    estimate = plan(c)

    build_start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("meta"):  # shapes only, for the counts: the engine builds the real one
        model = Llama(c.model)
    flops_per_token = model.flops_per_token(a.seq)
    engine = build_engine(c, make_layout(tp=1, pp=1))
    print(f"{device_name}: model={a.model} {model.num_params() / 1e6:,.1f} M parameters, {c.trainer.precision.value},"
          f" ZeRO-{a.zero_stage}, micro-batch {a.micro_batch} x {a.seq} tokens, {flops_per_token / 1e9:.3f} GFLOP/token;"
          f" built in {time.perf_counter() - build_start:.0f}s")
    print(f"distlm plan: {estimate.training_peak / GiB:.1f} GiB per {'GPU' if use_cuda else 'rank (host)'} (weights "
          f"{estimate.weights / GiB:.1f}, gradients "
          f"{estimate.gradients / GiB:.1f}, optimizer {estimate.optimizer / GiB:.1f}, activations "
          f"{estimate.activations / GiB:.1f}) of {gpu_gb:.0f} GiB")

    device = engine.device
    batches = [torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), device=device) for _ in range(4)]
    tokens_per_step = a.micro_batch * a.seq
    sync = torch.cuda.synchronize if use_cuda else (lambda: None)
    flash = contextlib.nullcontext
    if use_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        flash = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        result = accumulate_and_step(engine, engine, iter([(batch[:, :-1], batch[:, 1:])]), 1, lambda: [0.0, 0.0],
                                     lambda losses: None)
        return result.micro_losses[0]

    def timed_variant(attention) -> tuple:
        """(tokens/s, seconds per step, peak GiB, last loss, compile seconds, warm-up seconds)."""
        before = compile_seconds()
        with attention():
            start = time.perf_counter()
            for i in range(a.warmup):
                step(i)
            sync()
            warmup_s = time.perf_counter() - start
            if use_cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for i in range(a.steps):
                loss = step(i)
            sync()
            seconds = (time.perf_counter() - start) / a.steps
        memory = torch.cuda.max_memory_allocated() / GiB if use_cuda else float("nan")
        return tokens_per_step / seconds, seconds, memory, loss, compile_seconds() - before, warmup_s

    def print_row(name, tok_s, seconds, memory, loss, compile_s, warmup_s) -> None:
        mfu = f"{flops_per_token * tok_s / peak:7.1%}" if peak else "    n/a"
        print(f"{name:28s} {tok_s:13,.0f} {seconds:8.3f} {mfu} {memory:9.1f} {estimate.training_peak / GiB:9.1f} {loss:7.3f} "
              f"{compile_s:10.1f} {warmup_s:10.1f}")

    # Each row as soon as its variant is done: a run cut short by a time limit keeps the rows it finished.
    print(f"\n{'variant':28s} {'tokens/s/GPU':>13s} {'step s':>8s} {'MFU':>7s} {'peak GiB':>9s} {'plan GiB':>9s} "
          f"{'loss':>7s} {'compile s':>10s} {'warm-up s':>10s}")
    rows = []
    for compiled in (False, True):
        name = f"DeepSpeed engine, compile {'on ' if compiled else 'off'}"
        try:
            if compiled:
                compile_blocks(engine.module)
            try:
                rows.append((name, *timed_variant(flash)))
            except RuntimeError as e:
                if flash is contextlib.nullcontext or "kernel" not in str(e):
                    raise
                print(f"{name}: the flash SDPA kernel was not taken ({str(e).splitlines()[0]}); again with SDPA's choice")
                rows.append((name + " (no flash)", *timed_variant(contextlib.nullcontext)))
            print_row(*rows[-1])
        except Exception as e:  # report it and go on: the other variant's numbers still count
            print(f"{name}: FAILED: {type(e).__name__}: {str(e)[:2000]}")
        gc.collect()

    if len(rows) == 2:
        print(f"speed-up from compile: {rows[1][1] / rows[0][1]:.2f}x", end="; ")
    print("MFU target >= 50 %")
    if len(rows) < 2:
        raise SystemExit("a variant failed (above)")


if __name__ == "__main__":
    main()
