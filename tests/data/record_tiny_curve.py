"""Record tests/data/tiny_cpu_fp32_curve.json: the per-step training loss of conftest.tiny_curve_config (model=tiny,
the first 200 Bible chapters as bible_shards makes them, one rank, 40 steps of 16 x 64 tokens) in fp32 on CPU.

tests/test_gpu.py compares the GPU's bf16 run of the same config with it; tests/test_train.py checks on every
`make test` that CPU training still gives it (so a change to the model, the data or the schedule asks for a new
recording instead of failing on a GPU later). Also recorded, as evidence for the GPU test's tolerance: the same run
in bf16 on CPU, and in fp32 with another seed.

    python tests/data/record_tiny_curve.py        # from the repository root, with the venv's python (~2 min)
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import deepspeed  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from conftest import (REPO, TINY_CURVE, by_step, fit, make_bible_shards, make_kjv_chapters,  # noqa: E402
                      tiny_curve_config)
from distributed import run_ranks  # noqa: E402

from distlm.data.shards import Manifest  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def differences(name: str, losses: list[float], reference: list[float]) -> dict[str, float]:
    gaps = [abs(a - b) for a, b in zip(losses, reference)]
    return {f"{name}_max_abs_diff": max(gaps), f"{name}_mean_abs_diff": sum(gaps) / len(gaps)}


def curve(data_dir: Path, run_dir: Path, *overrides: str) -> tuple[list[float], dict[int, float]]:
    run_ranks(fit, 1, tiny_curve_config(data_dir, run_dir, *overrides))
    losses = by_step(run_dir, "loss")
    return [losses[s] for s in sorted(losses)], by_step(run_dir, "val_loss")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chapters = make_kjv_chapters(root / "kjv.jsonl")
        ray.init(address="local", num_cpus=2)
        try:
            shards = make_bible_shards(chapters, root)
        finally:
            ray.shutdown()
        manifest = Manifest.load(shards)
        fp32, val = curve(shards, root / "fp32")
        bf16, _ = curve(shards, root / "bf16", "trainer.precision=bf16")
        other_seed, _ = curve(shards, root / "seed", "seed=4321")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    record = {
        "what": "per-step training loss of conftest.tiny_curve_config in fp32 on CPU (tests/data/record_tiny_curve.py)",
        "recorded": datetime.date.today().isoformat(),
        "commit": commit.strip(),
        "machine": f"{cpu_name()}, 1 thread per rank",
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "train_samples": manifest.splits["train"].samples,
        "losses": fp32,
        "val_loss": {str(step): loss for step, loss in val.items()},
        "evidence": {
            "cpu_bf16_losses": bf16,
            **differences("cpu_bf16", bf16, fp32),
            **differences("other_seed", other_seed, fp32),
        },
    }
    TINY_CURVE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {TINY_CURVE}: loss {fp32[0]:.4f} -> {fp32[-1]:.4f}; CPU bf16 differs by at most "
          f"{record['evidence']['cpu_bf16_max_abs_diff']:.4f}, another seed by "
          f"{record['evidence']['other_seed_max_abs_diff']:.4f}")


if __name__ == "__main__":
    main()
