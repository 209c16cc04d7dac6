"""Elastic training and restarts supervised by the driver, on a real Ray cluster of two raylets: a node dies
and the run goes on with fewer workers, grows back when the node returns, and survives the death of Ray
Train's controller; a worker range without a valid layout is refused before anything starts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import train_overrides
from ray_nodes import REPO, LocalRayCluster, started

from distlm.checkpoint import store
from distlm.config import ConfigError, compose_config, raise_if
from distlm.train.worker.metrics import last_per_step, read_metrics
from distlm.validation import data_parallel_for, validate_train

# Long enough that, on an idle machine, the run on 2 workers is still going when the lost node is back
# (a restarted raylet, a capacity check, a save): at 60 steps it once finished first and never grew.
STEPS = 100
GLOBAL = ["trainer.micro_batch_size=2", "cluster.num_workers=4", "cluster.cpus_per_worker=1"]  # global batch 8


def overrides(data_dir: Path, run_dir: Path, *more: str) -> list[str]:
    return train_overrides(data_dir, run_dir, f"trainer.max_steps={STEPS}", "trainer.eval_every=1000",
                           "trainer.checkpoint_every=10", *GLOBAL, *more)


def losses(run_dir: Path) -> dict[int, float]:
    return dict(last_per_step(read_metrics(run_dir), "loss"))  # redone steps: the newest wins


def attempts(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "attempt" in r]


# ---------------------------------------------------------------- the worker range, before launch

@pytest.mark.parametrize("workers, tp, pp, micro, accum, dp", [(4, 1, 1, 2, 1, 4), (3, 1, 1, 2, 1, 2), (2, 1, 1, 2, 1, 2),
                                                                 (7, 2, 1, 1, 1, 2), (16, 2, 2, 1, 3, 4),
                                                                 (5, 1, 1, 1, 1, 4), (1, 2, 1, 1, 1, None)])
def test_a_worker_count_maps_to_the_largest_layout_that_keeps_the_global_batch(workers, tp, pp, micro, accum, dp):
    c = compose_config("cluster.num_workers=8" if tp * pp < 4 else "cluster.num_workers=16", f"parallel.tp={tp}",
                       f"parallel.pp={pp}", f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}",
                       "model.n_layers=4")
    assert data_parallel_for(c, workers) == dp
    assert dp is None or c.global_batch_size % (dp * micro) == 0


def test_a_range_below_one_model_replica_is_refused_before_launch(bible_shards, tmp_path):
    # Global batch 2 x 1 x 4 = 8 at 4 workers: 3 workers hold dp 3, which cannot keep it, but dp 2 can.
    assert validate_train(compose_config(*overrides(bible_shards, tmp_path, "cluster.min_workers=3"))) == []
    fewer_than_a_replica = compose_config(*overrides(bible_shards, tmp_path, "parallel.tp=2", "cluster.min_workers=1"))
    with pytest.raises(ConfigError, match=r"cluster.min_workers=1 must be in \[parallel.tp x parallel.pp = 2, "
                                          r"cluster.num_workers=4\]"):
        raise_if(validate_train(fewer_than_a_replica))
    out = subprocess.run([sys.executable, "-m", "distlm.cli", "train", *overrides(bible_shards, tmp_path / "r",
                          "parallel.tp=2", "cluster.min_workers=1")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "cluster.min_workers=1 must be in" in out.stdout + out.stderr
    assert "starting a local Ray cluster" not in out.stdout + out.stderr, "refused before any Ray started"


# ---------------------------------------------------------------- a real cluster of two raylets (2 CPUs each)

@pytest.fixture(scope="module")
def two_nodes():
    with started(LocalRayCluster([2, 2], fast_health_checks=True)) as cluster:
        yield cluster


def run_train(cluster: LocalRayCluster, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distlm.cli", "train", *args, f"cluster.address={cluster.gcs}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env, cwd=REPO)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    return output


def wait_until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def straight(two_nodes, bible_shards, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run: 4 workers, dp 4, on both nodes."""
    run_dir = tmp_path_factory.mktemp("straight")
    finish(run_train(two_nodes, overrides(bible_shards, run_dir)))
    return losses(run_dir)


def close(a: dict[int, float], b: dict[int, float], steps) -> list[int]:
    return [s for s in steps if abs(a[s] - b[s]) > 1e-5 * abs(b[s])]


def test_a_lost_node_shrinks_the_run_and_its_return_grows_it_back(two_nodes, straight, bible_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(two_nodes, overrides(bible_shards, run_dir, "cluster.min_workers=2", "cluster.max_failures=2",
                                          "cluster.elastic_check_seconds=2"))
    wait_until(lambda: any(s >= 15 for s in losses(run_dir)), "step 15")  # the checkpoint of step 10 is on disk
    killed_at = max(losses(run_dir))
    assert two_nodes.kill_node(1) > 0
    wait_until(lambda: len(attempts(run_dir)) >= 2, "the run to go on after the node died")
    shrunk = attempts(run_dir)[1]
    assert (shrunk["workers"], shrunk["grad_accum"], shrunk["layout"]) == (2, 2, "tp 1 x pp 1 x dp 2")
    assert shrunk["step"] == 10 * (killed_at // 10), "only the steps since the last checkpoint are redone"
    wait_until(lambda: max(losses(run_dir)) >= shrunk["step"] + 3, "training on 2 workers")
    two_nodes.start_node(1)  # capacity returns
    output = finish(proc)
    grown = attempts(run_dir)[2:]
    assert grown and (grown[0]["workers"], grown[0]["grad_accum"]) == (4, 1), attempts(run_dir)
    assert "the worker group failed" in output and "restarting from the newest checkpoint" in output
    assert "capacity for 4 workers is back (running 2)" in output
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert close(got, straight, range(1, STEPS + 1)) == [], "per-step losses differ from the uninterrupted run"
    assert store.find_latest(run_dir / "checkpoints") == store.tag_for_step(STEPS)


def test_a_killed_train_controller_is_restarted_by_the_driver(two_nodes, straight, bible_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(two_nodes, overrides(bible_shards, run_dir, "cluster.max_failures=1"))
    wait_until(lambda: any(s >= 15 for s in losses(run_dir)), "step 15")

    def controllers() -> list[psutil.Process]:
        return [p for p in two_nodes.processes() if "TrainController" in " ".join(p.cmdline())]

    [controller] = controllers()
    controller.send_signal(signal.SIGKILL)
    output = finish(proc)
    assert "Ray Train's controller died" in output and "restarting from the newest checkpoint" in output
    assert len(attempts(run_dir)) == 2
    got = losses(run_dir)
    assert close(got, straight, range(1, STEPS + 1)) == []
