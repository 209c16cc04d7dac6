"""Asynchronous checkpoints (trainer.async_checkpoint) on real gloo ranks: the files are those a synchronous save
writes, whatever training does meanwhile; a rank killed (kill -9) mid-write or a stop during a write never loses the
newest complete checkpoint; retention and the object-storage mirror count only complete checkpoints."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import by_step, train_config
from distributed import run_ranks

from distlm.checkpoint import store
from distlm.config import compose_config
from distlm.plan import checkpoint_snapshot_bytes, stage_params

SMALL = ["trainer.micro_batch_size=2", "trainer.eval_every=100", "trainer.eval_batches=1", "logger.samples=0"]
# The pipeline last: after a PipelineModule, DeepSpeed's global state breaks the next non-pipeline engine.
LAYOUTS = {"zero1": ["parallel.zero_stage=1"], "zero3": ["parallel=zero3"], "tp2_pp2": ["parallel=tp2_pp2"]}


def _files(tag_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tag_dir.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- the host copy (one process)

Pair = collections.namedtuple("Pair", "a b")


class Scaler:  # stands for DeepSpeed's small records in a state dict (LossScaler, fragment_address, ...)
    def __init__(self):
        self.scale = 1.0


def test_a_host_copy_saves_to_the_bytes_of_the_original_and_keeps_them_after_it_changes(tmp_path):
    from distlm.checkpoint.writer import HostBuffers, snapshot

    flat = torch.randn(100)
    scaler, shapes = Scaler(), collections.OrderedDict(w=torch.Size([4, 5]))
    master = torch.randn(7).requires_grad_()  # ZeRO's fp32 partition: a leaf that requires grad
    tagged = torch.randn(3)
    tagged.ds_id = 5  # Python attributes are pickled with the tensor
    state = {"module": collections.OrderedDict(w=flat[10:30].view(4, 5), b=flat[50:]),  # views of one storage
             "param": torch.nn.Parameter(torch.randn(3)), "master": master, "tagged": tagged, "empty": torch.empty(0),
             "pair": Pair(flat[:2], 3), "scalers": [scaler, scaler], "shapes": shapes, "again": shapes}
    torch.save(state, tmp_path / "original.pt")
    copied = snapshot(state, HostBuffers())
    assert copied.nbytes == 100 * 4 + 3 * 4 + 7 * 4 + 3 * 4  # each storage once
    with torch.no_grad():
        flat.add_(1)
        master.mul_(2)
    scaler.scale = 2.0
    (tmp_path / "copy").mkdir()
    torch.save(copied.state, tmp_path / "copy" / "original.pt")  # the same file name: the zip archive's name
    assert (tmp_path / "copy" / "original.pt").read_bytes() == (tmp_path / "original.pt").read_bytes()
    (tmp_path / "now").mkdir()
    torch.save(state, tmp_path / "now" / "original.pt")  # the check can fail: the original did change
    assert (tmp_path / "now" / "original.pt").read_bytes() != (tmp_path / "original.pt").read_bytes()


# ---------------------------------------------------------------- the files (4 ranks)

def _same_bytes(rank: int, data_dir: Path, root: Path) -> None:
    """Per layout: train 2 steps and save in the background; save the same step synchronously; save it in the
    background again with the write held back until one more training step has changed every weight and moment;
    then resume from that checkpoint."""
    from distlm.checkpoint import writer
    from distlm.train.worker.trainer import Trainer

    write, gate = writer.write_durably, threading.Event()

    def held_back(*args):
        if threading.current_thread() is not threading.main_thread():
            gate.wait()
        write(*args)

    for name, layout in LAYOUTS.items():
        run = root / name
        c = train_config(data_dir, run, *SMALL, *layout, "cluster.num_workers=4", "trainer.max_steps=4",
                         "trainer.stop_at_step=2", "trainer.checkpoint_every=100")
        trainer = Trainer(c)
        trainer.fit()  # saves step 2 in the background; fit returns when it is complete
        snapshot_bytes = trainer.checkpoints.snapshot_bytes
        tokenizer = trainer.manifest.tokenizer_path
        store.save(trainer.engine, run / "sync", trainer.state, tokenizer, keep=1)  # from the live tensors
        trainer.checkpoints.ckpt_dir = run / "during"
        gate.clear()
        writer.write_durably = held_back
        try:
            trainer.checkpoints.save(trainer.state)
            batches = trainer._model_batches(trainer.train_data.iter_batches(start_sample=trainer.state.samples_seen))
            loss3, _, _ = trainer._train_step(batches, trainer._control_flags)  # changes what the copy was taken of
            gate.set()
            trainer.checkpoints.wait()
        finally:
            writer.write_durably = write
        store.save(trainer.engine, run / "after", trainer.state, tokenizer, keep=1)  # step 3's state, as step 2
        Trainer(train_config(data_dir, run / "resumed", *SMALL, *layout, "cluster.num_workers=4",
                             "trainer.max_steps=4", "trainer.stop_at_step=3",
                             f"trainer.resume={run / 'during' / 'step00000002'}")).fit()
        (run / f"rank{rank}.json").write_text(json.dumps({"loss3": loss3, "snapshot_bytes": snapshot_bytes}))


@pytest.fixture(scope="module")
def same_bytes(bible_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("same_bytes")
    run_ranks(_same_bytes, 4, bible_shards, root)
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_asynchronous_save_writes_the_bytes_of_a_synchronous_one(same_bytes, layout):
    run = same_bytes / layout
    background = _files(run / "checkpoints" / "step00000002")
    assert background == _files(run / "sync" / "step00000002")
    assert len([n for n in background if n.endswith(".pt")]) >= 4  # DeepSpeed's shards and the RNG files
    assert not any(n.startswith(".") for p in run.rglob("*") for n in [p.name] if "partial" in n)  # staging removed


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_what_training_changes_after_the_copy_is_not_in_the_files(same_bytes, layout):
    run = same_bytes / layout
    during = _files(run / "during" / "step00000002")
    assert during == _files(run / "sync" / "step00000002")
    after = _files(run / "after" / "step00000002")  # the state one step later: the check can fail
    assert [n for n in during if n.endswith("_states.pt") and during[n] != after[n]], "the step changed nothing"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resuming_from_an_asynchronous_checkpoint_is_exact(same_bytes, layout):
    run = same_bytes / layout
    loss3 = {json.loads((run / f"rank{r}.json").read_text())["loss3"] for r in range(4)}
    assert len(loss3) == 1  # every rank's averaged loss
    assert by_step(run / "resumed", "loss")[3] == loss3.pop()


@pytest.mark.parametrize("layout", ["zero1", "zero3"])
def test_the_planner_counts_the_host_copy_an_asynchronous_save_makes(same_bytes, layout):
    run = same_bytes / layout
    copied = max(json.loads((run / f"rank{r}.json").read_text())["snapshot_bytes"] for r in range(4))
    c = compose_config("model=test", "data.tokenizer.vocab_size=512", *LAYOUTS[layout], "cluster.num_workers=4")
    planned = checkpoint_snapshot_bytes(stage_params(c.model, 1, 1)[0], 4, c.parallel.zero_stage, mixed=False)
    assert planned == pytest.approx(copied, rel=0.02)


# ---------------------------------------------------------------- kill -9, a stop, retention, the mirror (2 ranks)

RETENTION = ["trainer.max_steps=30", "trainer.checkpoint_every=5", "trainer.keep_checkpoints=2"]


def _kill_mid_write(rank: int, data_dir: Path, run: Path) -> None:
    """Rank 1 writes half of its optimizer shard of step 15, waits until training has gone on to step 17, and
    kills itself (SIGKILL) with the file half written."""
    from distlm.checkpoint import writer
    from distlm.train.worker.trainer import Trainer

    write = writer.write_durably

    def half_then_die(save, state, path, staging):
        if rank == 1 and path.parent.name == "step00000015" and "optim_states" in path.name:
            staging.mkdir(exist_ok=True)
            whole = staging / "whole.pt"
            save(state, str(whole))
            (staging / path.name).write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])  # half of it
            whole.unlink()
            while trainer.state.step < 17:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        write(save, state, path, staging)

    writer.write_durably = half_then_die
    trainer = Trainer(train_config(data_dir, run, *SMALL, *RETENTION))
    trainer.fit()


def _two_rank_runs(rank: int, data_dir: Path, root: Path) -> None:
    from distlm.checkpoint import writer
    from distlm.train.worker.trainer import Trainer

    def fit(name, *overrides):
        Trainer(train_config(data_dir, root / name, *SMALL, *overrides)).fit()

    fit("straight", *RETENTION)
    # A stop asked for (as the driver does on SIGTERM) while step 4's files are being written, slowly.
    write = writer.write_durably

    def slow(save, state, path, staging):
        if path.parent.name == "step00000004":
            if rank == 0:
                (root / "stop" / store.STOP_FILE).write_text("SIGTERM")
            time.sleep(1.0)
        write(save, state, path, staging)

    writer.write_durably = slow
    try:
        fit("stop", "trainer.max_steps=10", "trainer.checkpoint_every=4")
    finally:
        writer.write_durably = write
    (root / "stop" / f"returned_rank{rank}").write_text(repr(time.time()))
    # The mirror: a run stops at step 4; a new run dir (a new cluster) starts from the mirror and finishes; the
    # first run dir resumes from its own checkpoint and finishes too.
    mirror = f"trainer.checkpoint_mirror=file://{root / 'mirror'}"
    first = ["trainer.max_steps=6", "trainer.checkpoint_every=2", mirror]
    fit("first", *first, "trainer.stop_at_step=4")
    fit("new_cluster", *first)
    fit("first", *first)


@pytest.fixture(scope="module")
def two_rank_runs(bible_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_ranks")
    (root / "stop").mkdir()
    run_ranks(_two_rank_runs, 2, bible_shards, root)
    return root


def test_retention_keeps_the_newest_two_complete_checkpoints(two_rank_runs):
    ckpt_dir = two_rank_runs / "straight" / "checkpoints"
    assert store.complete_tags(ckpt_dir) == ["step00000025", "step00000030"]
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) == ["step00000025", "step00000030"]


def test_a_rank_killed_mid_write_restarts_from_the_previous_complete_checkpoint(two_rank_runs, bible_shards, tmp_path):
    run = tmp_path / "killed"
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):  # rank 1: SIGKILL (rank 0: gloo)
        run_ranks(_kill_mid_write, 2, bible_shards, run)
    ckpt_dir = run / "checkpoints"
    assert max(by_step(run, "loss")) >= 17  # training went on while step 15 was being written
    half = ckpt_dir / "step00000015" / ".rank00001.partial"
    assert [p.name for p in half.iterdir()] == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # cut in half
    assert store.complete_tags(ckpt_dir) == ["step00000005", "step00000010"]  # nothing pruned, step 15 unpublished
    assert store.find_latest(ckpt_dir) == "step00000010"
    run_ranks(_resume, 2, bible_shards, run)
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert next(b for a, b in zip(steps, steps[1:]) if b <= a) == 11  # the restart began after step 10
    straight, resumed = by_step(two_rank_runs / "straight", "loss"), by_step(run, "loss")
    assert [resumed[s] for s in range(1, 31)] == [straight[s] for s in range(1, 31)]
    assert store.complete_tags(ckpt_dir) == ["step00000025", "step00000030"]


def _resume(rank: int, data_dir: Path, run: Path) -> None:
    from distlm.train.worker.trainer import Trainer

    Trainer(train_config(data_dir, run, *SMALL, *RETENTION)).fit()


def test_a_stop_during_a_background_write_ends_the_run_only_after_the_checkpoints_are_complete(two_rank_runs):
    run = two_rank_runs / "stop"
    ckpt_dir = run / "checkpoints"
    stopped = max(by_step(run, "loss"))
    assert 4 < stopped < 8  # the stop was seen at a step after 4 (the next regular save is at 8) ...
    assert by_step(run, "checkpoint_wait_seconds")[stopped] > 0.5  # ... whose save waited for step 4's
    assert store.complete_tags(ckpt_dir) == ["step00000004", store.tag_for_step(stopped)]
    assert store.find_latest(ckpt_dir) == store.tag_for_step(stopped)
    published = (ckpt_dir / store.tag_for_step(stopped) / store.STATE_FILE).stat().st_mtime
    assert all(float((run / f"returned_rank{r}").read_text()) >= published for r in (0, 1))


def test_the_mirror_holds_the_complete_checkpoints_and_a_new_cluster_starts_from_it(two_rank_runs):
    root = two_rank_runs
    mirror = root / "mirror"
    assert sorted(p.name for p in mirror.iterdir() if p.is_dir()) == ["step00000004", "step00000006"]
    assert (mirror / "latest").read_text() == "step00000006"
    assert _files(mirror / "step00000006") == _files(root / "first" / "checkpoints" / "step00000006")
    new = by_step(root / "new_cluster", "loss")
    assert min(new) == 5  # it started from the mirror's step 4, downloaded into its empty run dir
    first = by_step(root / "first", "loss")
    assert [new[s] for s in (5, 6)] == [first[s] for s in (5, 6)]
