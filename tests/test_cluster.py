"""Cluster launch files pass Ray's own schema; placement keeps tensor-parallel groups inside a node;
`distlm submit` checks before it uploads, and runs a real training job across two Ray nodes."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray_nodes import LocalRayCluster, started

from distlm.checkpoint import store
from distlm.cluster import forwarded_env, worker_node_problems
from distlm.config import ConfigError, compose_config, raise_if, to_dict
from distlm.train.worker.metrics import read_metrics
from distlm.validation import node_placement_problems, validate_cluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DISTLM = [sys.executable, "-m", "distlm.cli"]


def checked(path: Path | dict) -> dict:
    """What `ray up` does to a cluster yaml before it launches anything: fill in defaults, then validate."""
    config = yaml.safe_load(path.read_text()) if isinstance(path, Path) else copy.deepcopy(path)
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------- cluster yamls, offline

@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_cluster_yaml_passes_rays_schema(name):
    prepared = checked(REPO / "cluster" / name)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("typo, message", [
    (lambda c: c.update(max_wokers=4), "'max_wokers' was unexpected"),
    (lambda c: c["available_node_types"]["gpu"].update(min_worker=0), "'min_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu"].update(max_workers="eight"), "'eight' is not of type 'integer'"),
    (lambda c: c.update(head_node_type="haed"), "head_node_type` must be one of"),
])
def test_typo_in_cluster_yaml_is_caught(typo, message):
    config = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    typo(config)
    with pytest.raises(Exception, match=message):
        checked(config)


def test_gpu_nodes_hold_the_workers_conf_cluster_gpu_places_on_them():
    nodes = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())["available_node_types"]
    cl = compose_config("cluster=gpu").cluster
    gpu_node = nodes["gpu"]["resources"]
    assert gpu_node["GPU"] == cl.workers_per_node and cl.use_gpu
    assert gpu_node["CPU"] >= cl.workers_per_node * cl.cpus_per_worker
    assert nodes["head"]["resources"] == {"CPU": 0}, "the head must run no training"
    assert cl.num_workers % cl.workers_per_node == 0


# ---------------------------------------------------------------- placement rule

@pytest.mark.parametrize("num_workers, tp, per_node", [(16, 8, 8), (16, 4, 8), (24, 2, 8), (8, 1, 8), (4, 2, None),
                                                       (12, 4, 8), (2, 1, 1)])
def test_tp_groups_that_fit_in_a_node_pass(num_workers, tp, per_node):
    assert node_placement_problems(num_workers, tp, per_node) == []


@pytest.mark.parametrize("num_workers, tp, per_node, message", [
    (16, 16, 8, r"parallel.tp=16 is more than cluster.workers_per_node=8"),
    (12, 4, 6, r"workers_per_node=6 is not a multiple of parallel.tp=4.*valid parallel.tp: \[1, 2, 3, 6\]"),
    (8, 1, 0, r"workers_per_node=0 must be positive"),
])
def test_tp_group_across_nodes_is_refused(num_workers, tp, per_node, message):
    problems = node_placement_problems(num_workers, tp, per_node)
    assert len(problems) == 1
    with pytest.raises(ConfigError, match=message):
        raise_if(problems)


@pytest.fixture
def shared_run(tmp_path):
    """A run whose run_dir and data.dir a worker can see, as the driver left them just before launch."""
    c = compose_config(f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}", "parallel.tp=2")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    return c


def test_worker_on_a_node_that_shares_the_run_finds_nothing_wrong(shared_run):
    assert worker_node_problems(shared_run, workers_on_node=4, node="n1") == []


def test_worker_finds_a_tp_group_split_over_nodes(shared_run):
    [problem] = worker_node_problems(shared_run, workers_on_node=3, node="n1")
    assert "node n1 got 3 training workers, not a multiple of parallel.tp=2" in problem


def test_worker_on_a_node_without_the_shared_storage_says_so(shared_run, tmp_path):
    shutil.rmtree(tmp_path / "data")
    (tmp_path / "run" / "config.yaml").unlink()
    problems = worker_node_problems(shared_run, workers_on_node=2, node="n2")
    assert [p.split(":")[0] for p in problems] == [f"node n2 cannot see {tmp_path / 'run' / 'config.yaml'}, which "
                                                   f"the driver just wrote", f"node n2 cannot see "
                                                   f"{tmp_path / 'data' / 'manifest.json'}"]


def test_worker_notices_another_runs_config_in_its_run_dir(shared_run):
    other = dataclasses.replace(shared_run, seed=shared_run.seed + 1)
    [problem] = worker_node_problems(other, workers_on_node=2, node="n1")
    assert "finds another run's config" in problem


def test_driver_joining_a_cluster_forwards_the_variables_named_in_conf(monkeypatch):
    names = compose_config().cluster.forward_env
    assert {"TORCH_EXTENSIONS_DIR", "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"} <= set(names)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("UNLISTED_VARIABLE", "x")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    env = forwarded_env(names)["env_vars"]
    assert env["WANDB_MODE"] == "offline" and "UNLISTED_VARIABLE" not in env and "WANDB_BASE_URL" not in env


def test_forward_env_names_are_checked():
    c = compose_config("cluster.forward_env=[WANDB_MODE,'NOT-A-NAME']")
    assert validate_cluster(c) == ["cluster.forward_env: ['NOT-A-NAME'] are not environment variable names"]


def test_layout_rule_is_part_of_the_config_checks():
    c = compose_config("cluster=gpu", "cluster.workers_per_node=6", "cluster.num_workers=12", "parallel.tp=4")
    assert any("not a multiple of parallel.tp=4" in p for p in validate_cluster(c))


# ---------------------------------------------------------------- distlm submit, before anything ships

def run_distlm(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*DISTLM, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_submit_refuses_relative_paths_before_uploading():
    # Port 9 (discard) has no job server: a config error must come before any connection attempt.
    out = run_distlm("submit", "--address", "http://127.0.0.1:9", "train", "run_dir=runs/x", "data.dir=data/bible")
    assert out.returncode == 2, out.stderr
    assert "relative paths ['run_dir=runs/x', 'data.dir=data/bible']" in out.stderr
    assert "storage every node mounts" in out.stderr


def test_submit_rejects_a_bad_key_before_uploading():
    out = run_distlm("submit", "--address", "http://127.0.0.1:9", "train", "trainer.max_step=5")
    assert out.returncode == 2 and "trainer.max_step" in out.stderr and "did you mean trainer.max_steps?" in out.stderr


def test_submit_without_an_address_says_where_to_get_one():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = run_distlm("submit", "train", env=env)
    assert out.returncode == 2 and "RAY_ADDRESS" in out.stderr and "ray dashboard cluster/gpu.yaml" in out.stderr


# ---------------------------------------------------------------- two real Ray nodes on this machine

@pytest.fixture(scope="module")
def two_nodes():
    with started(LocalRayCluster([1, 1])) as cluster:
        yield cluster


def test_submitted_jobs_preprocess_and_train_across_two_nodes(two_nodes, kjv_chapters, tmp_path):
    started = time.perf_counter()
    corpus = tmp_path / "kjv.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in kjv_chapters[:120]), encoding="utf-8")
    data_dir, run_dir = tmp_path / "shards", tmp_path / "run"
    secret = f"wandb-secret-{secrets.token_hex(12)}"
    env = {**two_nodes.env, "WANDB_API_KEY": secret}
    data = ["data.seq_len=64", "data.tokenizer.vocab_size=512", f"data.dir={data_dir}"]
    pre = run_distlm("submit", "--address", two_nodes.address, "--wait", "--job-id", "test-preprocess", "preprocess",
                     f"data.inputs=[{corpus}]", "data.samples_per_shard=256", "data.tokenize_task_mb=0.02", *data, env=env)
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    assert (data_dir / "manifest.json").is_file()

    train = run_distlm("submit", "--address", two_nodes.address, "--wait", "--job-id", "test-train", "train",
                       "model=test", *data, f"run_dir={run_dir}", "cluster.num_workers=2", "cluster.workers_per_node=1",
                       "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.eval_every=4",
                       "trainer.eval_batches=1", "trainer.checkpoint_every=2", "optimizer.warmup_steps=1",
                       "logger.mode=offline", "logger.samples=2", "logger.sample_tokens=4", env=env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "job test-train SUCCEEDED" in train.stdout
    assert "environment passed to the job: RAY_JOB_STOP_WAIT_TIME_S, WANDB_API_KEY (values not shown)" in train.stdout

    workers = two_nodes.actors("RayTrainWorker")
    assert len({w["node_id"] for w in workers}) == 2, "the two training workers should sit on different nodes"
    ckpt_dir = run_dir / "checkpoints"
    assert store.complete_tags(ckpt_dir) == ["step00000002", "step00000004"]
    rng_files = {p.name for p in (ckpt_dir / "step00000004").glob("rng_rank*.pt")}
    assert rng_files == {"rng_rank00000.pt", "rng_rank00001.pt"}, "both ranks, one per node, saved their state"
    assert max(r["step"] for r in read_metrics(run_dir)) == 4

    # The secret reached the job (wandb's auto mode would have gone online with it; offline was asked for)
    # but was written nowhere: not in the job's logs, the run directory, the checkpoints or wandb's files.
    assert secret not in pre.stdout + pre.stderr + train.stdout + train.stderr
    for path in [*run_dir.rglob("*"), *data_dir.rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret written to {path}"
    print(f"two-node preprocess + train jobs: {time.perf_counter() - started:.0f}s")
