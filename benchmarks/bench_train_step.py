"""Training-step throughput, measured in one process against baselines on the same config and threads:

  (a) distlm's Llama in a plain torch loop (AdamW)
  (b) Hugging Face transformers' LlamaForCausalLM, same shapes, same loop     -> ratio a / b (target >= 1.3)
  (c) distlm's Llama through a DeepSpeed engine (ZeRO-1, 1 rank, gloo)       -> ratio c / a (target >= 0.95)

    python benchmarks/bench_train_step.py [--dim 256 --layers 4 --seq 256 --batch 8 --steps 20 --threads 2]

On a GPU (when one is present) it also prints MFU for (a) and (c) in bf16: FLOPs per token are
6 * non-embedding parameters + 12 * layers * dim * seq_len (PaLM, appendix B), over the GPU's dense
bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch

from distlm.config import compose_config
from distlm.model.llama import Llama
from distlm.train.metrics import peak_flops


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPU)")
    return p.parse_args()


def config(a: argparse.Namespace, device: str, bf16: bool):
    return compose_config(
        f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
        f"model.n_kv_heads={a.kv_heads}", f"model.ffn_dim={a.ffn}", f"data.tokenizer.vocab_size={a.vocab}",
        f"data.seq_len={a.seq}", f"trainer.micro_batch_size={a.batch}", "cluster.num_workers=1",
        f"cluster.use_gpu={device == 'cuda'}", f"trainer.precision={'bf16' if bf16 else 'fp32'}",
        f"trainer.max_steps={a.steps + a.warmup + 1}", "optimizer.warmup_steps=1")


def hf_llama(c):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = c.model
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attn_implementation="sdpa"))


def time_steps(step, batches, warmup: int, device: str) -> float:
    """Seconds per step, after warm-up steps."""
    for batch in batches[:warmup]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def plain_step(model, bf16: bool, device: str, hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def step(batch):
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if hf:  # HF shifts labels itself: give it the same targets as distlm
                logits = model(input_ids=inputs).logits
                loss = model.loss_function(logits, labels=None, shift_labels=labels.contiguous(), vocab_size=logits.shape[-1])
            else:
                loss = model(inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def deepspeed_step(c, device: str):
    import deepspeed
    import torch.distributed as dist

    from distlm.parallel.layout import make_layout
    from distlm.train.engine import build_engine

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    torch.manual_seed(0)
    engine = build_engine(c, make_layout(tp=1, pp=1))

    def step(batch):
        batch = batch.to(engine.device)
        loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()
    return step


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = a.bf16 or device == "cuda"
    c = config(a, device, bf16)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device) for _ in range(a.steps + a.warmup)]
    tokens_per_step = a.batch * a.seq
    torch.manual_seed(0)
    ours = Llama(c.model).to(device)
    flops_per_token = ours.flops_per_token(a.seq)
    print(f"model: {ours.num_params() / 1e6:.1f}M params, batch {a.batch} x {a.seq}, {a.threads} threads, "
          f"{device}, {'bf16' if bf16 else 'fp32'}")

    results = {}
    results["distlm (plain loop)"] = time_steps(plain_step(ours, bf16, device, hf=False), batches, a.warmup, device)
    del ours
    torch.manual_seed(0)
    hf = hf_llama(c).to(device)
    results["transformers LlamaForCausalLM"] = time_steps(plain_step(hf, bf16, device, hf=True), batches,
                                                          a.warmup, device)
    del hf
    results["distlm (DeepSpeed ZeRO-1)"] = time_steps(deepspeed_step(c, device), batches, a.warmup, device)

    peak = peak_flops(c)
    for name, seconds in results.items():
        tok_s = tokens_per_step / seconds
        mfu = f"  MFU {flops_per_token * tok_s / peak:6.1%}" if peak else ""
        print(f"{name:32s} {tok_s:12,.0f} tokens/s{mfu}")
    base = results["distlm (plain loop)"]
    print(f"distlm / transformers:           {results['transformers LlamaForCausalLM'] / base:.2f}x  (target >= 1.3)")
    print(f"DeepSpeed path / plain loop:     {base / results['distlm (DeepSpeed ZeRO-1)']:.2f}x  (target >= 0.95)")


if __name__ == "__main__":
    main()
