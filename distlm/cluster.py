"""Connecting to Ray (a given cluster, or a local one started inside the command), and where training
workers go on it: one Ray Train worker per GPU, whole tensor-parallel groups per node, shared storage."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray
import yaml

from distlm.config import ClusterConfig, Config, to_dict

log = logging.getLogger(__name__)

JOB_RUNTIME_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver


class PlacementError(RuntimeError):
    """A worker landed where training cannot work (a TP group split over nodes, storage it cannot see)."""


def connect(cluster: ClusterConfig, cpus_needed: int = 0, dashboard: bool = True) -> None:
    """Join cluster.address (or RAY_ADDRESS, which a submitted job has); with neither, start a local
    cluster with at least `cpus_needed` logical CPUs, so N workers can be placed even on a smaller machine."""
    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=forwarded_env(cluster.forward_env), log_to_driver=True)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        log.info("cluster: %d nodes, %g CPUs, %g GPUs", len(nodes), sum(n["Resources"].get("CPU", 0) for n in nodes),
                 sum(n["Resources"].get("GPU", 0) for n in nodes))
    else:
        num_cpus = max(os.cpu_count() or 1, cpus_needed)
        log.info("starting a local Ray cluster with %d CPUs", num_cpus)
        # Its processes are this one's children and inherit its environment: nothing to forward. The
        # dashboard also serves the state API that Ray Train's clean-up watcher polls; preprocessing needs
        # none and starts faster without it.
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, include_dashboard=dashboard)


def forwarded_env(names: list[str]) -> dict | None:
    """The runtime env that gives workers on other machines the driver's variables named in cluster.forward_env
    (compiled-op cache, offline hubs, wandb mode: what they need to behave like the driver)."""
    if JOB_RUNTIME_ENV in os.environ:
        # A submitted job: its runtime env (working dir, env vars) reaches every worker already, and Ray
        # refuses a second one naming the same variables (printing their values in the error).
        return None
    env = {k: os.environ[k] for k in names if k in os.environ}
    return {"env_vars": env} if env else None


def scaling_config(cluster: ClusterConfig, label_selector: dict[str, str] | None = None):
    """One Ray Train worker per GPU (or per CPU process). PACK fills a node before using the next, and Ray
    Train numbers ranks node by node, so the consecutive ranks of a tensor-parallel group share a node
    whenever each node holds a multiple of tp workers (checked by config validation and on every worker).
    `label_selector` limits the nodes every worker may use (the driver keeps unanswering nodes out)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                         resources_per_worker={"CPU": cluster.cpus_per_worker}, placement_strategy="PACK",
                         label_selector=label_selector)


def check_worker_node(c: Config) -> None:
    """Run first on every Ray Train worker: fail at once, naming the node, where training could not work."""
    import ray.train

    ctx = ray.train.get_context()
    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    problems = worker_node_problems(c, ctx.get_local_world_size(), node)
    if problems:
        raise PlacementError(f"worker {ctx.get_world_rank()}: " + "; ".join(problems))
    if ctx.get_local_rank() == 0:  # one line per node
        log.info("node %s: node rank %d holds world ranks from %d (%d workers)", node, ctx.get_node_rank(),
                 ctx.get_world_rank() - ctx.get_local_rank(), ctx.get_local_world_size())


def worker_node_problems(c: Config, workers_on_node: int, node: str) -> list[str]:
    """What a worker can see is wrong with the node it landed on.

    - Tensor-parallel groups must not straddle nodes: PACK can still split them when a node was partly busy.
    - run_dir and data.dir must be the driver's: on a multi-node cluster that means storage every node mounts
      (NFS, FSx for Lustre, ...); a node-local path would scatter checkpoint shards over the nodes' disks.
      The driver wrote run_dir/config.yaml just before launch: a worker that reads back the same config sees
      the same run_dir."""
    problems = []
    tp = c.parallel.tp
    if workers_on_node % tp:
        problems.append(f"node {node} got {workers_on_node} training workers, not a multiple of parallel.tp={tp}: a "
                        f"tensor-parallel group would span two nodes. Give training whole, free nodes "
                        f"(cluster.num_workers a multiple of cluster.workers_per_node) or lower parallel.tp")
    run_config_file = Path(c.run_dir) / "config.yaml"
    if not run_config_file.is_file():
        problems.append(f"node {node} cannot see {run_config_file}, which the driver just wrote: on a multi-node "
                        f"cluster run_dir must be on storage every node mounts (e.g. run_dir=/fsx/runs/NAME); "
                        f"see docs/cluster.md")
    elif yaml.safe_load(run_config_file.read_text()) != to_dict(c):
        problems.append(f"node {node} finds another run's config in {run_config_file}: run_dir is not the "
                        f"driver's (a node-local directory?) or another job writes to it")
    for data_dir in [source.dir for source in c.data.mix] if c.data.mix else [c.data.dir]:   # data.mix: every source
        manifest = Path(data_dir) / "manifest.json"
        if not manifest.is_file():
            problems.append(f"node {node} cannot see {manifest}: data.dir must be on storage every node mounts "
                            f"(e.g. data.dir=/fsx/data/NAME); see docs/cluster.md")
    return problems
