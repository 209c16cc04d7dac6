"""What document masking costs per training step, against the plain causal step on the same model, data
and threads, in one process:

    python benchmarks/bench_doc_masking.py [--dim 256 --layers 4 --seq 256 --batch 8 --docs 4 --steps 10]

(a) causal: SDPA with is_causal (the flash kernel on GPU), attention across the whole packed sample
(b) masked: attention inside each document (trainer.doc_masking=true) and positions restarted per document;
    on CPU an SDPA boolean mask, on CUDA a flex-attention BlockMask (compiled kernel; the first steps compile)
Each sample holds --docs documents of random lengths. The two alternate over --repeats rounds and the best
round of each counts (the least disturbed on a shared machine). Prints tokens/s of both and (b) / (a).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from distlm.config import compose_config
from distlm.model.llama import Llama, document_positions


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--docs", type=int, default=4, help="documents per packed sample")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args()


def random_doc_ids(batch: int, seq: int, docs: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq] document numbers: docs - 1 random boundaries per sample."""
    marks = torch.zeros(batch, seq, dtype=torch.long)
    for row in marks:
        row[torch.randperm(seq - 1, generator=generator)[: docs - 1] + 1] = 1
    return marks.cumsum(dim=1)


def seconds_per_step(model, optimizer, batches, warmup: int, device: str, masked: bool) -> float:
    def step(tokens, doc_ids):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if masked:
                loss = model(inputs, labels, doc_ids=doc_ids, position_ids=document_positions(doc_ids))
            else:
                loss = model(inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for tokens, doc_ids in batches[:warmup]:
        step(tokens, doc_ids)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for tokens, doc_ids in batches[warmup:]:
        step(tokens, doc_ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = compose_config(f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
                       f"model.n_kv_heads={a.kv_heads}", f"model.ffn_dim={a.dim * 8 // 3}",
                       f"data.tokenizer.vocab_size={a.vocab}", f"data.seq_len={a.seq}")
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=generator).to(device),
                random_doc_ids(a.batch, a.seq, a.docs, generator).to(device)) for _ in range(a.steps + a.warmup)]
    torch.manual_seed(0)
    model = Llama(c.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    print(f"model: {model.num_params() / 1e6:.1f}M params, batch {a.batch} x {a.seq}, {a.docs} documents per sample, "
          f"{a.threads} threads, {device}{', bf16' if device == 'cuda' else ', fp32'}; masked kernel: "
          f"{'flex_attention BlockMask' if device == 'cuda' else 'SDPA boolean mask'}")
    best = {"causal": float("inf"), "masked": float("inf")}
    for _ in range(a.repeats):
        for name in best:
            best[name] = min(best[name], seconds_per_step(model, optimizer, batches, a.warmup, device, name == "masked"))
    tokens = a.batch * a.seq
    for name, seconds in best.items():
        print(f"{name:8s} {tokens / seconds:10,.0f} tokens/s  ({seconds * 1e3:.1f} ms/step)")
    print(f"masked / causal throughput: {best['causal'] / best['masked']:.3f}")


if __name__ == "__main__":
    main()
