"""Connecting to Ray: a given cluster, or a local one started inside the command."""

from __future__ import annotations

import logging
import os

import ray

from distlm.config import ClusterConfig

log = logging.getLogger(__name__)

# Variables the workers need to behave like the driver (compiled-op cache, offline hubs, wandb mode).
FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_API_KEY", "DS_ACCELERATOR",
                 "OMP_NUM_THREADS")


def connect(cluster: ClusterConfig, cpus_needed: int = 0) -> None:
    """Join cluster.address (or RAY_ADDRESS); with neither, start a local cluster with at least
    `cpus_needed` logical CPUs, so N workers can be placed even on a smaller machine."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = max(os.cpu_count() or 1, cpus_needed)
        log.info("starting a local Ray cluster with %d CPUs", num_cpus)
        # The dashboard also serves the state API that Ray Train's clean-up watcher polls.
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=True)
