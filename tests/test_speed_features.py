"""Speed features on real parts: torch.compile of the blocks under DP, ZeRO 0-3, TP and a pipeline on two gloo
ranks (the same losses as eager), GPU-right defaults in the config, and the loop's after-step decisions."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import train_config
from distributed import run_ranks

from distlm.config import Precision, compose_config
from distlm.model.llama import Block
from distlm.train.worker.metrics import last_per_step, read_metrics
from distlm.train.worker.step import AfterStep, after_step

STEPS = 3
SMALL = [f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.eval_every=100",
         "trainer.eval_batches=1", "trainer.checkpoint_every=100", "logger.samples=0", "optimizer.warmup_steps=1"]
# The last: after a PipelineModule, DeepSpeed's global state breaks the next non-pipeline engine in a process.
LAYOUTS = {"zero0": ["parallel.zero_stage=0"], "zero1": ["parallel.zero_stage=1"], "zero2": ["parallel.zero_stage=2"],
           "zero3": ["parallel=zero3"], "tp2": ["parallel=tp2"], "cp2": ["parallel.cp=2"], "pp2": ["parallel=pp2"]}


def _eager_and_compiled(rank: int, data_dir: Path, root: Path) -> None:
    from distlm.train.worker.trainer import Trainer

    for name, layout in LAYOUTS.items():
        for compiled in (False, True):
            run_dir = root / f"{name}_{'compiled' if compiled else 'eager'}"
            trainer = Trainer(train_config(data_dir, run_dir, *SMALL, *layout, f"trainer.compile={compiled}"))
            blocks = [m for m in trainer.engine.module.modules() if isinstance(m, Block)]
            compiled_blocks = sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / f"blocks_rank{rank}.txt").write_text(f"{compiled_blocks}/{len(blocks)}")
            trainer.fit()


@pytest.fixture(scope="module")
def runs(bible_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compiled")
    run_ranks(_eager_and_compiled, 2, bible_shards, root)
    return root


def losses(run_dir: Path) -> dict[int, float]:
    return dict(last_per_step(read_metrics(run_dir), "loss"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_blocks_train_as_eager_ones(runs, layout):
    eager, compiled = runs / f"{layout}_eager", runs / f"{layout}_compiled"
    assert (compiled / "blocks_rank0.txt").read_text() == (compiled / "blocks_rank1.txt").read_text()
    done, total = map(int, (compiled / "blocks_rank0.txt").read_text().split("/"))
    assert done == total > 0, f"{done} of {total} blocks compiled on rank 0"
    assert (eager / "blocks_rank0.txt").read_text().startswith("0/")
    assert sorted(losses(compiled)) == sorted(losses(eager)) == list(range(1, STEPS + 1))
    for step, loss in losses(eager).items():
        assert losses(compiled)[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    val_eager, val_compiled = (dict(last_per_step(read_metrics(run), "val_loss")) for run in (eager, compiled))
    assert val_compiled[STEPS] == pytest.approx(val_eager[STEPS], rel=1e-4)  # the updates were the same too
    assert val_eager[STEPS] < val_eager[0] - 0.01  # and they trained: not a comparison of two constants


def test_compile_time_is_in_the_metrics(runs):
    # zero0 is the first compiled run of its processes: the later ones reuse its compiled code.
    seconds = last_per_step(read_metrics(runs / "zero0_compiled"), "compile_seconds")
    assert [step for step, _ in seconds] == list(range(1, STEPS + 1))
    assert all(s > 0 and math.isfinite(s) for _, s in seconds)
    assert not last_per_step(read_metrics(runs / "zero0_eager"), "compile_seconds")


# ---------------------------------------------------------------- config defaults, no ranks

def test_precision_auto_is_bf16_on_gpus_and_fp32_on_cpus():
    assert compose_config("cluster.use_gpu=true").trainer.precision == Precision.bf16
    assert compose_config("cluster.use_gpu=false").trainer.precision == Precision.fp32
    assert compose_config("cluster.use_gpu=true", "trainer.precision=fp32").trainer.precision == Precision.fp32


# ---------------------------------------------------------------- what the loop does after a step

def test_evaluate_and_save_on_their_schedule_and_at_the_end():
    t = compose_config("trainer.eval_every=4", "trainer.checkpoint_every=6").trainer
    assert after_step(3, 10, t, False, False) == AfterStep(evaluate=False, save=False, stop=False)
    assert after_step(4, 10, t, False, False) == AfterStep(evaluate=True, save=False, stop=False)
    assert after_step(6, 10, t, False, False) == AfterStep(evaluate=False, save=True, stop=False)
    assert after_step(10, 10, t, False, False) == AfterStep(evaluate=True, save=True, stop=False)


def test_a_stop_request_saves_and_stops_and_a_due_time_only_saves():
    t = compose_config("trainer.eval_every=4", "trainer.checkpoint_every=6").trainer
    assert after_step(3, 10, t, True, False) == AfterStep(evaluate=False, save=True, stop=True)
    assert after_step(3, 10, t, False, True) == AfterStep(evaluate=False, save=True, stop=False)


def test_the_gpu_suite_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_suite.sh (pytest -m gpu, then gpu_check.sh) gives every GPU number in one run; --tiny keeps
    it, and gpu_check.sh --tiny inside it, runnable where no GPU is lent."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--tiny", str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})  # this interpreter
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert done.stdout.endswith(summary) and "-- pytest -m gpu: passed" in summary and "-- gpu_check.sh: passed" in summary
    # Every gpu test was collected and skipped, saying why.
    collected = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "tests/test_gpu.py"],
                               cwd=root, capture_output=True, text=True).stdout
    count = int(re.search(r"(\d+) tests? collected", collected).group(1))
    assert count >= 5 and f"{count} skipped" in summary and "needs CUDA" in summary
    # gpu_check's table: a row per variant whose numbers agree with each other (--tiny: 2 x 64 tokens a step).
    check = (tmp_path / "gpu_check.log").read_text()
    rows = dict(re.findall(r"^(DeepSpeed engine, compile o(?:n|ff))\s+(.*)$", check, flags=re.M))
    rows = {name: numbers.split() for name, numbers in rows.items()}
    assert list(rows) == ["DeepSpeed engine, compile off", "DeepSpeed engine, compile on"], check
    tokens_per_s = {}
    for name, (tok_s, step_s, _mfu, _memory, _plan, loss, compile_s, _warmup_s) in rows.items():
        tokens_per_s[name] = float(tok_s.replace(",", ""))
        assert abs(tokens_per_s[name] * float(step_s) - 2 * 64) <= tokens_per_s[name] * 0.0005 + 1, name  # rounding
        assert 0 < float(loss) < math.log(512) + 1, name  # random tokens over a 512-token vocabulary
        assert (float(compile_s) > 0) == name.endswith("on"), name
    speedup = float(check.split("speed-up from compile: ")[1].split("x")[0])
    assert speedup == pytest.approx(tokens_per_s["DeepSpeed engine, compile on"] /
                                    tokens_per_s["DeepSpeed engine, compile off"], abs=0.01)
    assert all(line in summary for line in check.splitlines() if line.startswith("DeepSpeed engine"))
