"""Peak host memory of `distlm export` against the model's size: the export streams tensors from the
checkpoint to its output files, so its peak should be about one output file plus a few tensors.

    python benchmarks/bench_export.py [--dim 768 --layers 24 --vocab 4096 --tp 2 --pp 2 --max-shard-mb 20]

Writes, with real DeepSpeed engines on tp x pp gloo ranks (ZeRO-1, fp32, saved after one step),
a checkpoint of a >= 150M-parameter Llama and a tiny one of the same layout, then exports each in a fresh
process: first the tiny one (libraries loaded, code pages touched), then, after resetting the peak, the big
one with `export.max_shard_mb`; it prints the peak RSS above that point. The same is measured for the export
of `--before` (default: the commit before streaming export), which read the whole model and verified it with
two whole models. Each export is measured with glibc's default allocator settings and with
MALLOC_MMAP_THRESHOLD_=131072, where freed tensors go back to the system at once (by default glibc keeps freed
blocks below an adaptive threshold of up to 32 MB in its heap, which RSS counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # run_ranks: real gloo ranks, as the tests start them
from distributed import run_ranks  # noqa: E402

from distlm.checkpoint import store  # noqa: E402
from distlm.config import compose_config, to_dict  # noqa: E402
from distlm.model.llama import Llama  # noqa: E402
from distlm.parallel.layout import make_layout  # noqa: E402
from distlm.train.worker.engine import build_engine  # noqa: E402

MEASURE = """\
import json, sys
from distlm.config import compose_config
from distlm.hf.export import export

def status(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024

warm_up, out, *overrides = sys.argv[1:]
export(compose_config(f"export.checkpoint_dir={warm_up}", f"export.out_dir={out}.warm_up"))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current RSS
base = status("VmRSS:")
export(compose_config(f"export.out_dir={out}", *overrides))
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--max-shard-mb", type=float, default=20)
    p.add_argument("--before", default="10c24f3", help="the commit whose export is the baseline ('' to skip)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory under ./build)")
    return p.parse_args()


def model_config(a: argparse.Namespace, run_dir: Path, tiny: bool):
    shape = ["model.dim=64", f"model.n_layers={a.pp}", "model.n_heads=4", "model.ffn_dim=176"] if tiny else \
        [f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}", f"model.ffn_dim={a.ffn}"]
    kv = 4 if tiny else a.heads
    return compose_config(*shape, f"model.n_kv_heads={kv}", f"data.tokenizer.vocab_size={a.vocab}",
                          "data.seq_len=128", f"parallel.tp={a.tp}", f"parallel.pp={a.pp}", "parallel.zero_stage=1",
                          f"cluster.num_workers={a.tp * a.pp}", "trainer.micro_batch_size=1",
                          f"trainer.grad_accum={a.pp}", f"run_dir={run_dir}")


def _save(rank: int, c, tokenizer_file: Path) -> None:
    torch.manual_seed(c.seed)
    engine = build_engine(c, make_layout(tp=c.parallel.tp, pp=c.parallel.pp))
    # One step, so that the optimizer files hold Adam's moments (the earlier export's universal conversion needs them).
    ids = torch.randint(0, c.model.vocab_size, (c.trainer.grad_accum, 65), generator=torch.Generator().manual_seed(0))
    engine.train_batch(data_iter=iter([(x[None, :-1], x[None, 1:]) for x in ids]))
    state = store.RunState(config=to_dict(c), tokenizer_sha256=hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
    store.save(engine, Path(c.run_dir) / "checkpoints", state, tokenizer_file, keep=1)


def tokenizer(vocab: int, path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 10, trainer)
    tok.save(str(path))
    return path


def measure(src: Path, warm_up: Path, ckpt: Path, out: Path, max_shard_mb: float, malloc: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", **malloc}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(warm_up), str(out), f"export.checkpoint_dir={ckpt}",
                           f"export.max_shard_mb={max_shard_mb}"], capture_output=True, text=True, env=env, cwd=src)
    if proc.returncode:
        raise RuntimeError(f"export with {src} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(f"{out}.warm_up", ignore_errors=True)
    return {"growth": result["peak"] - result["base"], "files": sorted(out.glob("*.safetensors"))}


def main() -> None:
    a = parse_args()
    (REPO / "build").mkdir(exist_ok=True)
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_export_", dir=REPO / "build"))
    root.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(a.vocab, root / "tokenizer.json")
    big, tiny = model_config(a, root / "big", tiny=False), model_config(a, root / "tiny", tiny=True)
    for c in (tiny, big):
        if not (Path(c.run_dir) / "checkpoints" / store.LATEST_FILE).is_file():
            run_ranks(_save, a.tp * a.pp, c, tok)
    with torch.device("meta"):
        n_params = Llama(big.model).num_params()
        shapes = {k: v.numel() * 4 for k, v in Llama(big.model).state_dict().items()}
    model_bytes = 4 * n_params
    largest_tensor = max(shapes.values())
    print(f"model: {n_params / 1e6:.1f}M parameters, {model_bytes / 2**20:,.0f} MiB fp32, tp {a.tp} x pp {a.pp}, "
          f"ZeRO-1; largest tensor {largest_tensor / 2**20:.1f} MiB; export.max_shard_mb={a.max_shard_mb}")

    sources = {"streaming (this tree)": REPO}
    if a.before:
        before = root / f"src_{a.before}"
        if not before.is_dir():
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", a.before, "distlm", "conf"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        sources[f"whole model ({a.before})"] = before
    for name, src in sources.items():
        for label, malloc in (("glibc default", {}), ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            # A copy of hard links: the older export writes the checkpoint's universal form into it.
            ckpts = {}
            for which, c in (("warm_up", tiny), ("big", big)):
                ckpts[which] = root / f"copy_{which}"
                shutil.rmtree(ckpts[which], ignore_errors=True)
                shutil.copytree(Path(c.run_dir) / "checkpoints", ckpts[which], copy_function=os.link)
            out = root / "hf"
            shutil.rmtree(out, ignore_errors=True)
            r = measure(src, ckpts["warm_up"], ckpts["big"], out, a.max_shard_mb, malloc)
            largest_file = max(f.stat().st_size for f in r["files"])
            print(f"{name:28s} {label:31s} peak RSS above start {r['growth'] / 2**20:8,.1f} MiB = "
                  f"{r['growth'] / model_bytes:5.2f} x the fp32 model, {r['growth'] / largest_file:6.2f} x the largest "
                  f"output file ({largest_file / 2**20:.1f} MiB; {len(r['files'])} files)")
    print(f"(files in {root})")


if __name__ == "__main__":
    main()
