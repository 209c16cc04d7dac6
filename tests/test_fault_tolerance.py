"""Fault tolerance on real parts: a real Ray cluster whose worker is killed (kill -9) or whose driver gets
SIGTERM, real DeepSpeed gloo ranks that skip NaN steps, resume exactly under ZeRO-3 and a pipeline, survive a
failed (disk-full) save, and corrupt checkpoints that are detected before loading."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import by_step, train_config, train_overrides
from distributed import run_ranks

from distlm.checkpoint import store
from distlm.config import CheckpointError, compose_config
from distlm.train import resume
from distlm.train.driver.launch import train
from distlm.train.worker.metrics import last_per_step, read_metrics
from distlm.train.worker.step import why_skip

STEPS = 100  # the Ray runs (50 ms a step here): long enough that a kill lands mid-run


def ray_overrides(data_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return train_overrides(data_dir, run_dir, f"trainer.max_steps={STEPS}", "trainer.eval_every=100",
                           "trainer.checkpoint_every=10", *overrides)


def ray_config(data_dir: Path, run_dir: Path, *overrides: str):
    return compose_config(*ray_overrides(data_dir, run_dir, *overrides))


def losses(run_dir: Path) -> dict[int, float]:
    return dict(last_per_step(read_metrics(run_dir), "loss"))  # a restart logs its steps again: the newest wins


def wait_for_step(run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in losses(run_dir)):
        assert time.monotonic() < deadline, f"no step {step} in {run_dir} after {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight_run(bible_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    train(ray_config(bible_shards, run_dir, "trainer.keep_every=10"))  # keeps every checkpoint (10, 20, ... 100)
    return run_dir


@pytest.fixture(scope="module")
def straight(straight_run) -> dict[int, float]:
    return losses(straight_run)


# ---------------------------------------------------------------- Ray: kill -9, SIGTERM

def test_a_killed_worker_restarts_the_group_from_the_newest_checkpoint(straight_run, straight, bible_shards,
                                                                     tmp_path):
    """kill -9 of rank 1 mid-run: Ray Train restarts both workers; they continue from this run's newest
    checkpoint (not from trainer.resume=PATH) and the losses are those of the uninterrupted run."""
    assert store.complete_tags(straight_run / "checkpoints") == [store.tag_for_step(s) for s in range(10, 101, 10)]
    run_dir = tmp_path / "run"
    killed = {}

    def kill_rank1() -> None:
        wait_for_step(run_dir, 25)  # the checkpoint of step 20 is on disk
        killed["pid"] = int((run_dir / "pids" / "rank1.pid").read_text())
        killed["step"] = max(losses(run_dir))
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank1, daemon=True)
    killer.start()
    summary = train(ray_config(bible_shards, run_dir, "cluster.max_failures=1",
                               f"trainer.resume={straight_run / 'checkpoints' / 'step00000010'}"))
    killer.join(timeout=1)
    assert killed, "the killer thread did not run"
    assert int((run_dir / "pids" / "rank1.pid").read_text()) != killed["pid"]  # a new worker process
    assert summary["steps"] == STEPS and killed["step"] < STEPS
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps[0] == 11  # it started from trainer.resume=PATH (step 10) ...
    restarted_at = next(b for a, b in zip(steps, steps[1:]) if b <= a)
    assert restarted_at > 11 and restarted_at % 10 == 1, steps  # ... restarted from its own newest (20 or later)
    got = losses(run_dir)
    assert [got[s] for s in range(11, STEPS + 1)] == [straight[s] for s in range(11, STEPS + 1)]


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(straight, bible_shards, tmp_path):
    """`distlm train` (joined to this test's Ray cluster, as a submitted job's driver is) gets SIGTERM. Its workers
    write every checkpoint file 1 s late (tests/data/slow_checkpoint_writes): the stop's save is still being written
    in the background when the loop ends, and the driver exits only once it is complete."""
    run_dir = tmp_path / "run"
    address = f"cluster.address={ray.get_runtime_context().gcs_address}"
    slow = Path(__file__).parent / "data" / "slow_checkpoint_writes"
    env = {**os.environ, "DISTLM_TEST_WRITE_DELAY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    forward = "cluster.forward_env=[TORCH_EXTENSIONS_DIR,HF_HUB_OFFLINE,WANDB_MODE,PYTHONPATH,DISTLM_TEST_WRITE_DELAY]"
    proc = subprocess.Popen([sys.executable, "-m", "distlm.cli", "train", *ray_overrides(bible_shards, run_dir), address,
                             forward], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        # Steps are fast here: signal once the workers have started, and they stop at the first step.
        deadline = time.monotonic() + 600
        while not (run_dir / "pids" / "rank0.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the workers did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - sent < 30
    assert "SIGTERM: the workers save a checkpoint at the next step and stop" in output
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS
    tag_dir = run_dir / "checkpoints" / store.tag_for_step(stopped_at)
    written = re.search(re.escape(f"step {stopped_at}: checkpoint {tag_dir} complete (written in the background in ")
                        + r"([\d.]+)s", output)  # logged by rank 0's worker before the driver exited
    assert written and float(written.group(1)) >= 1.0  # the slow writes reached the workers
    assert store.find_latest(run_dir / "checkpoints") == store.tag_for_step(stopped_at)
    store.verify(run_dir / "checkpoints" / store.tag_for_step(stopped_at))
    assert not (run_dir / store.STOP_FILE).exists()
    train(ray_config(bible_shards, run_dir))  # resume=auto
    got = losses(run_dir)
    assert [got[s] for s in range(1, STEPS + 1)] == [straight[s] for s in range(1, STEPS + 1)]


# ---------------------------------------------------------------- corrupt checkpoints (files only)

def test_a_corrupt_newest_checkpoint_is_skipped_and_named(straight_run, bible_shards, tmp_path, caplog):
    source = straight_run / "checkpoints"  # steps 10 to 100; the newest is damaged
    for damage in ("truncate", "delete", "no_state"):
        ckpt_dir = tmp_path / damage / "checkpoints"
        shutil.copytree(source, ckpt_dir)
        newest = ckpt_dir / "step00000100"
        shard = next(newest.glob("zero_pp_rank_1_*optim_states.pt"))
        if damage == "truncate":
            with shard.open("r+b") as f:
                f.truncate(shard.stat().st_size // 2)
        elif damage == "delete":
            shard.unlink()
        else:
            (newest / store.STATE_FILE).unlink()  # died before publishing
        caplog.clear()
        assert store.find_latest(ckpt_dir) == "step00000090", damage
        if damage != "no_state":
            assert f"checkpoint {newest} is" in caplog.text and shard.name in caplog.text
            with pytest.raises(CheckpointError, match=f"checkpoint {newest} is .*{shard.name}"):
                store.resolve(newest)  # resume=PATH naming it
        c = ray_config(bible_shards, ckpt_dir.parent)
        assert resume.checkpoint_to_resume(c) == ckpt_dir / "step00000090"
    # A file whose size is right but whose end was overwritten (no zip directory) is caught as well.
    ckpt_dir = tmp_path / "overwritten" / "checkpoints"
    shutil.copytree(source, ckpt_dir)
    model = ckpt_dir / "step00000100" / "mp_rank_00_model_states.pt"
    with model.open("r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\0" * 64)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is not a whole torch file"):
        store.verify(ckpt_dir / "step00000100")


# ---------------------------------------------------------------- real gloo ranks without Ray

SMALL = ["trainer.max_steps=6", "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.eval_every=1",
         "trainer.eval_batches=1", "trainer.checkpoint_every=100", "logger.samples=0"]


class PoisonedLoss:
    """Test-only loss function, installed on a built trainer's model: the training loss of one rank is multiplied
    by `factor` (NaN: a bad batch; 10: a spike) at the given STEP or STEP:MICRO_BATCH (comma-separated), after
    the forward pass. The rank is 0, or in a pipeline the last stage (the only one that computes the loss)."""

    def __init__(self, trainer, at: str, factor: float = float("nan")):
        self.trainer, self.model, self.factor = trainer, trainer.engine.module, factor
        self.loss_fn = self.model.loss_fn
        self.at = {tuple(map(int, (s + ":0").split(":")[:2])) for s in at.split(",")}
        self.step, self.micro = 0, -1
        self.poisons = trainer.layout.is_last_stage if trainer.pipelined else trainer.rank == 0

    def __call__(self, logits, labels):
        loss = self.loss_fn(logits, labels)
        if not self.model.training:  # evaluations
            return loss
        step = self.trainer.state.step + 1
        self.step, self.micro = step, (self.micro + 1 if step == self.step else 0)
        if (step, self.micro) in self.at and self.poisons:
            loss = loss * self.factor
        return loss


def _scenarios(rank: int, data_dir: Path, root: Path) -> None:
    """Every scenario on the same two gloo ranks (one spawn): each writes its run dir under root."""
    from distlm.train.worker.trainer import Trainer

    def config(name, *overrides):
        return train_config(data_dir, root / name, *SMALL, *overrides)

    def fit(c, nan_at: str = "", factor: float = float("nan")) -> Trainer:
        trainer = Trainer(c)
        if nan_at:
            trainer.engine.module.loss_fn = PoisonedLoss(trainer, nan_at, factor)
        trainer.fit()
        return trainer

    # NaN losses under ZeRO 0-3: in the first micro-batch of step 3, or in the second (after one backward).
    for stage in range(4):
        for micro in (0, 1):
            fit(config(f"skip_z{stage}_m{micro}", f"parallel.zero_stage={stage}"), nan_at=f"3:{micro}")
    # Too many skipped steps in a row: a clear error; the checkpoints stay intact.
    c = config("diverging", "trainer.max_skipped_in_a_row=2", "trainer.checkpoint_every=1")
    try:
        fit(c, nan_at="3,4,5")
    except FloatingPointError as e:
        (root / "diverging" / "error.txt").write_text(str(e))
    # Time-based and permanent checkpoints: every step is "due" after 0.0001 minutes; keep 1 + every 2nd.
    fit(config("timed", "trainer.checkpoint_minutes=0.00001", "trainer.keep_checkpoints=1", "trainer.keep_every=2",
               "trainer.eval_every=100"))
    # Disk full while saving: rank 1 cannot write more than 1 KB per file. Synchronous, the save raises; in the
    # background, the failure rides on the next step's flags, and every rank raises at that step.
    for name, asynchronous in (("disk_full", True), ("disk_full_sync", False)):
        overrides = ("trainer.eval_every=100", f"trainer.async_checkpoint={str(asynchronous).lower()}")
        trainer = fit(config(name, "trainer.stop_at_step=1", *overrides))
        trainer.state.step = 2
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
        try:
            trainer.save()
            if asynchronous:
                trainer.checkpoints.in_flight.done.wait()  # the background write has failed
                batches = trainer._model_batches(trainer.train_data.iter_batches(start_sample=trainer.state.samples_seen))
                flags = trainer._train_step(batches, trainer._control_flags)[2]
                (root / name / f"flags_rank{rank}.txt").write_text(json.dumps(flags))
                trainer.checkpoints.wait()  # what fit() does when the flag is set
            error = "no error"
        except CheckpointError as e:
            error = str(e)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        (root / name / f"error_rank{rank}.txt").write_text(error)
        fit(config(name, "trainer.stop_at_step=3", *overrides))  # resumes from step 1
    # Exact resume under ZeRO-3 and a 2-stage pipeline: 6 steps straight = 3, stop, resume, 3. Last: after a
    # PipelineModule, DeepSpeed's global state breaks the next non-pipeline engine in this process.
    for name, layout in (("zero3", ["parallel=zero3"]), ("pp2", ["parallel=pp2"])):
        fit(config(f"{name}_straight", *layout))
        fit(config(f"{name}_split", *layout, "trainer.stop_at_step=3"))
        fit(config(f"{name}_split", *layout))
    # A pipeline step updates before its loss is known (trainer.py, _pipeline_step): a NaN under ZeRO-1 is caught by
    # DeepSpeed's overflow check and skipped; under ZeRO-0 it stops the run; a spike is applied and logged.
    fit(config("pp2_nan_z1", "parallel=pp2", "trainer.max_steps=5"), nan_at="3")
    try:
        fit(config("pp2_nan_z0", "parallel=pp2", "parallel.zero_stage=0", "trainer.max_steps=5",
                   "trainer.checkpoint_every=1"), nan_at="3")
        error = "no error"
    except FloatingPointError as e:
        error = str(e)
    (root / "pp2_nan_z0" / f"error_rank{rank}.txt").write_text(error)
    log = logging.FileHandler(root / f"pp2_spike_rank{rank}.log")
    logging.getLogger("distlm").addHandler(log)
    try:
        fit(config("pp2_spike", "parallel=pp2", "trainer.max_steps=5", "trainer.spike_min_history=2"),
            nan_at="4:0,4:1", factor=10.0)
    finally:
        logging.getLogger("distlm").removeHandler(log)
        log.close()


@pytest.fixture(scope="module")
def scenarios(bible_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenarios")
    run_ranks(_scenarios, 2, bible_shards, root)
    return root


@pytest.mark.parametrize("stage", range(4))
def test_a_nan_step_is_skipped_without_touching_the_model(scenarios, stage):
    first, second = scenarios / f"skip_z{stage}_m0", scenarios / f"skip_z{stage}_m1"
    for run in (first, second):
        val, lr, skipped = by_step(run, "val_loss"), by_step(run, "lr"), by_step(run, "skipped_steps")
        assert val[3] == val[2] and val[4] != val[3]  # step 3 left the weights as they were; step 4 trained
        assert lr[4] == lr[3] != lr[2]  # nor was the LR schedule advanced: step 4 uses the lr step 3 did not
        assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
        assert by_step(run, "grad_norm").get(3) is None
    # A NaN after one micro-batch's backward: its gradients were dropped too, so the run goes on exactly as
    # when the NaN came first.
    assert [by_step(second, "loss")[s] for s in (4, 5, 6)] == [by_step(first, "loss")[s] for s in (4, 5, 6)]


def test_too_many_skipped_steps_in_a_row_stop_with_a_clear_error(scenarios):
    run = scenarios / "diverging"
    error = (run / "error.txt").read_text()
    assert "step 5: 3 steps in a row were skipped (loss is nan), more than trainer.max_skipped_in_a_row=2" in error
    ckpt_dir = run / "checkpoints"
    assert store.find_latest(ckpt_dir) == "step00000004" and "latest: step00000004" in error
    assert store.verify(ckpt_dir / "step00000004").skipped_steps == 2


@pytest.mark.parametrize("name", ["zero3", "pp2"])
def test_resume_is_exact_under_zero3_and_a_pipeline(scenarios, name):
    straight, split = by_step(scenarios / f"{name}_straight", "loss"), by_step(scenarios / f"{name}_split", "loss")
    assert sorted(split) == sorted(straight) == list(range(1, 7))
    assert split == straight
    assert by_step(scenarios / f"{name}_split", "val_loss")[6] == by_step(scenarios / f"{name}_straight", "val_loss")[6]


def test_a_nan_pipeline_step_under_zero1_is_skipped_by_deepspeed_without_touching_the_model(scenarios):
    run = scenarios / "pp2_nan_z1"
    val, lr, skipped, loss = (by_step(run, k) for k in ("val_loss", "lr", "skipped_steps", "loss"))
    assert math.isnan(loss[3]) and all(math.isfinite(loss[s]) for s in (1, 2, 4, 5))
    assert val[3] == val[2] and val[4] != val[3]  # step 3 left the weights as they were; step 4 trained
    assert lr[4] == lr[3] != lr[2]  # nor was the LR schedule advanced: step 4 uses the lr step 3 did not
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}


def test_a_nan_pipeline_step_under_zero0_stops_the_run_before_a_checkpoint_keeps_it(scenarios):
    run = scenarios / "pp2_nan_z0"
    errors = {p.name: p.read_text() for p in run.glob("error_rank*.txt")}
    assert errors.keys() == {"error_rank0.txt", "error_rank1.txt"} and len(set(errors.values())) == 1  # every stage
    assert errors["error_rank0.txt"].startswith("step 3: loss is nan and the pipeline engine applied the update "
                                                "(ZeRO-0 has no overflow check)")
    assert "with parallel.zero_stage=1 to have such steps skipped" in errors["error_rank0.txt"]
    ckpt_dir = run / "checkpoints"
    assert store.find_latest(ckpt_dir) == "step00000002"  # the damaged weights of step 3 were never saved
    assert store.verify(ckpt_dir / "step00000002").step == 2


def test_a_loss_spike_in_a_pipeline_step_is_applied_and_logged(scenarios):
    run = scenarios / "pp2_spike"
    val, lr, skipped, loss = (by_step(run, k) for k in ("val_loss", "lr", "skipped_steps", "loss"))
    assert loss[4] > 3 * statistics.fmean(loss[s] for s in (1, 2, 3))  # the spike, as the loop saw it
    assert val[4] != val[3] and lr[5] != lr[4]  # the update was applied and the schedule advanced
    assert set(skipped.values()) == {0}
    warning = (scenarios / "pp2_spike_rank0.log").read_text()
    assert f"step 4: loss {loss[4]:.4f} is above 3 x the recent mean" in warning
    assert "a pipeline step cannot be skipped before its update, so it was applied" in warning


def test_time_based_and_permanent_checkpoints(scenarios):
    ckpt_dir = scenarios / "timed" / "checkpoints"
    assert store.complete_tags(ckpt_dir) == ["step00000002", "step00000004", "step00000006"]
    assert by_step(scenarios / "timed", "checkpoint_seconds").keys() == {1, 2, 3, 4, 5, 6}  # saved every step


@pytest.mark.parametrize("name", ["disk_full", "disk_full_sync"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_happened(scenarios, name):
    run = scenarios / name
    errors = {p.name: p.read_text() for p in run.glob("error_rank*.txt")}
    assert errors.keys() == {"error_rank0.txt", "error_rank1.txt"}  # every rank raised, none hung
    message = errors["error_rank0.txt"]
    assert message == errors["error_rank1.txt"]
    assert message.startswith(f"rank 1: saving checkpoint {run / 'checkpoints' / 'step00000002'} failed: ")
    assert "writing " in message and "MB free on the filesystem of" in message
    assert f"the previous checkpoint {run / 'checkpoints' / 'step00000001'} is intact" in message
    if name == "disk_full":  # in the background: the step after the save carried rank 1's failure to every rank
        assert {json.loads((run / f"flags_rank{r}.txt").read_text())[2] for r in (0, 1)} == {2.0}  # both knew
    # The run went on from step 1 afterwards (the same run dir, resume=auto) and saved step 3.
    assert store.complete_tags(run / "checkpoints") == ["step00000001", "step00000003"]
    assert sorted(by_step(run, "loss")) == [1, 2, 3]


def test_the_skip_rule():
    assert why_skip(float("nan"), [], 3.0, 5) == "loss is nan"
    assert why_skip(float("inf"), [1.0] * 5, None, 5) == "loss is inf"
    assert why_skip(3.5, [1.0] * 4, 3.0, 5) is None  # too little history to call anything a spike
    assert why_skip(3.5, [1.0] * 5, 3.0, 5) == "loss 3.5000 is above 3 x the recent mean 1.0000"
    assert why_skip(2.9, [1.0] * 5, 3.0, 5) is None
    assert why_skip(100.0, [1.0] * 5, None, 5) is None
