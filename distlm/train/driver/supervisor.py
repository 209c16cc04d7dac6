"""The driver's supervision of a run: every attempt is one Ray Train fit at a valid layout.

Ray Train restarts a failed worker group at the same size, and its elastic policy picks any worker count,
while distlm needs a count that makes a tp x pp x dp layout and keeps the global batch; and nothing restarts
a run whose Ray Train controller died. So the driver supervises, with Ray Train's own restarts off:

- after a failure (a worker, a node, the controller) it counts the workers the alive nodes can hold, takes
  the largest valid layout (`config.data_parallel_for`; workers beyond it stay idle) and starts a new fit
  that resumes from the run's newest checkpoint, through the universal form when the layout changed;
- while training at fewer than cluster.num_workers, every cluster.elastic_check_seconds it counts again;
  when a larger layout fits, the workers save at their next step and stop, and the run goes on at the larger
  size (so a run grows back at most elastic_check_seconds + one step + one save after capacity returns).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import ray

from distlm.compat.ray import remove_placement_groups
from distlm.config import ClusterConfig, Config
from distlm.validation import data_parallel_for

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    number: int  # 1 for the first fit of this command
    config: Config  # cluster.num_workers and trainer.grad_accum of this attempt
    reason: str  # why it started: "start", the failure it follows, or a resize
    at_launch_layout: bool  # the layout the command was launched with (and its resume plan made for)

    def describe(self) -> str:
        par = self.config.parallel
        return (f"{self.config.cluster.num_workers} workers = tp {par.tp} x pp {par.pp} x cp {par.cp} x dp "
                f"{self.config.data_parallel_size}, grad_accum {self.config.trainer.grad_accum}")


def config_for_workers(c: Config, workers: int) -> Config:
    """The run's config at the largest valid layout `workers` can hold, with the same global batch."""
    dp = data_parallel_for(c, workers)
    if dp is None:
        raise ValueError(f"{workers} workers cannot keep the global batch {c.global_batch_size}")
    attempt = copy.deepcopy(c)
    attempt.cluster.num_workers = dp * c.parallel.tp * c.parallel.pp * c.parallel.cp
    attempt.trainer.grad_accum = c.global_batch_size // (dp * c.trainer.micro_batch_size)
    return attempt


def workers_available(cl: ClusterConfig) -> int:
    """Training workers the alive nodes can hold (by their total resources, whoever uses them now)."""
    need = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.use_gpu else {})}
    return sum(min(int(node["Resources"].get(r, 0) // n) for r, n in need.items())
               for node in ray.nodes() if node["Alive"])


def is_elastic(c: Config) -> bool:
    """cluster.min_workers is set: the run may shrink after a failure and grow back."""
    return c.cluster.min_workers is not None


def failure_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.train import TrainingFailedError

    return TrainingFailedError, RayActorError  # a worker group that failed; the controller actor died


def supervise(c: Config, fit: Callable[[Attempt], None], request_stop: Callable[[str], None]) -> list[Attempt]:
    """Run `fit(attempt)` until an attempt ends without failing or growing; return the attempts.

    `request_stop(why)` makes the running workers save at their next step and stop (to grow). Failures beyond
    cluster.max_failures are raised."""
    attempts: list[Attempt] = []
    failures, reason = 0, "start"
    while True:
        workers = _wait_for_workers(c) if is_elastic(c) else c.cluster.num_workers
        config = config_for_workers(c, workers) if is_elastic(c) else c
        attempt = Attempt(len(attempts) + 1, config, reason,
                          at_launch_layout=config.cluster.num_workers == c.cluster.num_workers)
        attempts.append(attempt)
        if attempt.number > 1:
            log.warning("attempt %d (%s): %s", attempt.number, attempt.reason, attempt.describe())
        grow = threading.Event()
        watcher = _watch_for_capacity(c, attempt, grow, request_stop) if is_elastic(c) else None
        groups_before = set(ray.util.placement_group_table())
        try:
            fit(attempt)
        except failure_types() as e:
            failures += 1
            what = _what_died(e)
            remove_placement_groups(groups_before)
            if failures > c.cluster.max_failures:
                log.error("%s; that is failure %d, more than cluster.max_failures=%d: giving up", what, failures,
                          c.cluster.max_failures)
                raise
            log.warning("%s; restarting from the newest checkpoint (failure %d of cluster.max_failures=%d)", what,
                        failures, c.cluster.max_failures)
            reason = f"after failure {failures}: {what}"
            continue
        finally:
            if watcher:
                watcher.set()
        if not grow.is_set():
            return attempts
        reason = "grow: capacity returned"


def _what_died(e: BaseException) -> str:
    from ray.exceptions import RayActorError

    if isinstance(e, RayActorError):
        return f"Ray Train's controller died ({type(e).__name__})"
    failures = getattr(e, "worker_failures", None) or {}  # a WorkerGroupError: rank -> what it raised
    causes = "; ".join(f"rank {rank}: {type(err).__name__}: {_first_line(err)}" for rank, err in sorted(failures.items()))
    return f"the worker group failed ({causes or f'{type(e).__name__}: {_first_line(e)}'})"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _wait_for_workers(c: Config) -> int:
    """Wait (up to a few health-check periods) until the alive nodes hold at least cluster.min_workers."""
    deadline = time.monotonic() + max(60.0, c.cluster.elastic_check_seconds)
    while True:
        # Capped at num_workers; a node that just died may still count until Ray's health check notices.
        workers = min(workers_available(c.cluster), c.cluster.num_workers)
        if workers >= c.cluster.min_workers or time.monotonic() > deadline:
            return max(workers, c.cluster.min_workers)
        time.sleep(1.0)


def _watch_for_capacity(c: Config, attempt: Attempt, grow: threading.Event,
                        request_stop: Callable[[str], None]) -> threading.Event | None:
    """A thread that sets `grow` and stops the workers once more workers would make a larger layout."""
    running = attempt.config.cluster.num_workers
    if running >= c.cluster.num_workers:
        return None
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(c.cluster.elastic_check_seconds):
            workers = min(workers_available(c.cluster), c.cluster.num_workers)
            if config_for_workers(c, workers).cluster.num_workers > running:
                log.warning("capacity for %d workers is back (running %d): the workers save at the next step and "
                            "the run goes on at the larger size", workers, running)
                grow.set()
                request_stop(f"grow from {running} to {config_for_workers(c, workers).cluster.num_workers} workers")
                return

    threading.Thread(target=watch, name="distlm-elastic-watch", daemon=True).start()
    return stop
