"""Which nodes can take training workers now, and how many workers they hold.

Ray's node table alone is not enough after a failure. A node whose processes were killed (a machine lost) stays
"alive" in it until Ray's health check gives up on it: ≈13 s after its raylet dies with Ray's default settings,
≈65 s for a host that vanishes from the network; Ray Train reports the failed worker group 5-9 s after the kill
(measured 2026-12-06, docs/resilience.md). So, after a failure, a node counts only once it answers a probe: a
task of no resources pinned to it, which a live node runs in milliseconds (≈1 s the first time: a worker process
starts) and which fails exactly when Ray declares a dead node dead. Nodes that have not answered within
cluster.node_probe_seconds are planned without, and kept out of the next attempt (`avoid_selector`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import ray

from distlm.config import ClusterConfig

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries its id under this label


@dataclass(frozen=True)
class Capacity:
    workers: int  # training workers the counted nodes hold (by their total resources, whoever uses them now)
    nodes: frozenset[str]  # the counted nodes' ids
    silent: frozenset[str] = frozenset()  # alive in Ray's table, but no answer to the probe: kept out


def workers_on(node: dict, cl: ClusterConfig) -> int:
    """Training workers one node of `ray.nodes()` holds."""
    need = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.use_gpu else {})}
    return min(int(node["Resources"].get(resource, 0) // n) for resource, n in need.items())


def in_table(cl: ClusterConfig) -> dict[str, int]:
    """Node id -> training workers, for the nodes Ray's table calls alive that hold at least one."""
    held = {node["NodeID"]: workers_on(node, cl) for node in ray.nodes() if node["Alive"]}
    return {node: workers for node, workers in held.items() if workers > 0}


def table_capacity(cl: ClusterConfig) -> Capacity:
    """What Ray's node table says, without asking the nodes (a cheap look: the first attempt, growth checks)."""
    held = in_table(cl)
    return Capacity(sum(held.values()), frozenset(held))


def live_capacity(cl: ClusterConfig, wait_seconds: float, stop: threading.Event | None = None) -> Capacity:
    """The nodes Ray's table calls alive that also answer a probe within `wait_seconds` (or until `stop`)."""
    held = in_table(cl)
    answered, failed = probe(list(held), wait_seconds, stop)
    silent = frozenset(held) - answered - failed
    if silent:
        log.warning("%d node(s) that Ray still lists as alive did not answer within %gs, and are planned without: %s",
                    len(silent), wait_seconds, ", ".join(sorted(silent)))
    return Capacity(sum(held[node] for node in answered), answered, silent | failed)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


_ping = ray.remote(num_cpus=0, max_retries=0)(_node_id)


def probe(nodes: list[str], wait_seconds: float,
          stop: threading.Event | None = None) -> tuple[frozenset[str], frozenset[str]]:
    """(the nodes that ran a no-resource task pinned to them, those where it failed) within `wait_seconds`. Waits
    for every answer or failure: a dead node's task fails when Ray declares the node dead."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = {_ping.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(): node
            for node in nodes}
    pending, answered, failed = list(refs), set(), set()
    deadline = time.monotonic() + wait_seconds
    while pending and time.monotonic() < deadline and not (stop and stop.is_set()):
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
                answered.add(refs[ref])
            except Exception as e:  # noqa: BLE001 - the node died (TaskUnschedulableError) or cannot run work
                failed.add(refs[ref])
                log.info("node %s is gone or cannot run work (%s): planned without", refs[ref], type(e).__name__)
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    return frozenset(answered), frozenset(failed)


def avoid_selector(nodes: frozenset[str]) -> dict[str, str] | None:
    """A label selector that keeps workers off `nodes` (for ScalingConfig.label_selector); None for no nodes."""
    if not nodes:
        return None
    ids = sorted(nodes)
    return {NODE_ID_LABEL: f"!{ids[0]}" if len(ids) == 1 else f"!in({', '.join(ids)})"}
