"""The driver's supervision of a run: every attempt is one Ray Train fit at a valid layout.

Ray Train restarts a failed worker group at the same size, and its elastic policy picks any worker count,
while distlm needs a count that makes a tp x pp x dp layout and keeps the global batch; nothing restarts a run
whose Ray Train controller died; and its own start-up retries wait forever for resources that are gone. So the
driver supervises, with every retry of Ray Train's off (launch.py):

- after a failure (a worker, a node, the controller) it counts the workers the nodes that answer a probe can
  hold (nodes.py: a dying node stays "alive" in Ray's table for a while), takes the largest valid layout
  (`config.data_parallel_for`; workers beyond it stay idle) and starts a new fit that resumes from the run's
  newest checkpoint, through the universal form when the layout changed;
- every attempt must start within a bound: Ray Train's wait for the placement group (cluster.start_timeout_seconds,
  plus cluster.replace_wait_seconds while it waits for nodes that are not there yet), then as long again until
  rank 0 runs (the driver's watchdog). An attempt that does not start is ended and the run re-planned below that
  size, which then is not tried again until a new node joins; at the smallest size it spends a failure;
- while training at fewer than cluster.num_workers, every cluster.elastic_check_seconds it counts again;
  when a larger layout fits, the workers save at their next step and stop, and the run goes on at the larger
  size (so a run grows back at most elastic_check_seconds + one step + one save after capacity returns);
- fit() runs in a thread of its own, so the main thread keeps the signal handlers (launch.stop_on_signals) and
  can end an attempt that is still starting (`request_stop`) within seconds.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray

from distlm.checkpoint import store
from distlm.compat.ray import is_start_failure, kill_train_controller, remove_placement_groups
from distlm.config import Config, describe_layout
from distlm.files import write_atomic
from distlm.train.driver import nodes
from distlm.validation import data_parallel_for

log = logging.getLogger(__name__)

STARTED_FILE = "pids/training"  # in run_dir: rank 0 writes its attempt's number here as its workers start


@dataclass
class Attempt:
    number: int  # 1 for the first fit of this command
    config: Config  # cluster.num_workers and trainer.grad_accum of this attempt
    reason: str  # why it started: "start", the failure it follows, or a resize
    at_launch_layout: bool  # the layout the command was launched with (and its resume plan made for)
    start_timeout: float = 0.0  # Ray Train's wait for the workers' resources (its placement group), seconds
    avoid_nodes: frozenset[str] = frozenset()  # nodes that did not answer a probe: no worker goes there
    started: bool = field(default=False, compare=False)  # rank 0 of this attempt runs distlm's code

    def describe(self) -> str:
        par = self.config.parallel
        return (f"{self.config.cluster.num_workers} workers = "
                f"{describe_layout(par.tp, par.pp, par.cp, self.config.data_parallel_size)}, "
                f"grad_accum {self.config.trainer.grad_accum}")


class StartTimeout(RuntimeError):
    """An attempt's workers were placed but did not start training in time (the driver's watchdog)."""


@dataclass(frozen=True)
class Blocked:
    """A size whose attempt did not start, with the nodes counted then: no attempt that large is planned again
    until a node outside `nodes` joins (else a cluster whose resources are taken would be tried forever)."""
    workers: int
    nodes: frozenset[str]


def config_for_workers(c: Config, workers: int) -> Config:
    """The run's config at the largest valid layout `workers` can hold, with the same global batch."""
    dp = data_parallel_for(c, workers)
    if dp is None:
        raise ValueError(f"{workers} workers cannot keep the global batch {c.global_batch_size}")
    attempt = copy.deepcopy(c)
    attempt.cluster.num_workers = dp * c.parallel.tp * c.parallel.pp * c.parallel.cp
    attempt.trainer.grad_accum = c.global_batch_size // (dp * c.trainer.micro_batch_size)
    return attempt


def is_elastic(c: Config) -> bool:
    """cluster.min_workers is set: the run may shrink after a failure and grow back."""
    return c.cluster.min_workers is not None


def layout_size(c: Config, workers: int) -> int:
    """Workers of the largest valid layout within `workers` (never below cluster.min_workers' own)."""
    return config_for_workers(c, max(workers, c.cluster.min_workers)).cluster.num_workers


def smallest_size(c: Config) -> int:
    """The fewest workers the run may train on: cluster.num_workers for a fixed size."""
    return layout_size(c, c.cluster.min_workers) if is_elastic(c) else c.cluster.num_workers


def plan_workers(c: Config, capacity: int, ceiling: int, wait_for_nodes: bool) -> int:
    """The next attempt's workers, from the `capacity` that the alive nodes hold and the largest size worth
    trying (`ceiling`). With `wait_for_nodes` and cluster.replace_wait_seconds the attempt asks for the most it
    may (Ray Train's controller asks an autoscaler for the nodes while it waits) rather than shrink at once."""
    if not is_elastic(c):
        return c.cluster.num_workers
    top = min(c.cluster.num_workers, ceiling)
    return layout_size(c, top if wait_for_nodes and c.cluster.replace_wait_seconds > 0 else min(capacity, top))


def failure_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError
    from ray.train import TrainingFailedError

    return TrainingFailedError, RayActorError  # a worker group that failed; the controller actor died


class Supervisor:
    """Runs `prepare(attempt)()` (a resume plan, a conversion, then Ray Train's fit) attempt after attempt until
    one ends without failing or growing, or the run is asked to stop; failures beyond cluster.max_failures are
    raised."""

    def __init__(self, c: Config, prepare: Callable[[Attempt], Callable[[], None]]):
        self.c = c
        self.prepare = prepare
        self.run_dir = Path(c.run_dir)
        self.attempts: list[Attempt] = []
        self.blocked: Blocked | None = None
        self.current: tuple[Attempt, threading.Thread] | None = None  # the attempt running now, and its thread
        self.stop = threading.Event()  # the run is asked to stop (a signal)
        self.stop_saves = False  # ... and the workers were training: they save at the next step and stop

    # ------------------------------------------------------------ asked from the signal handlers

    def training(self) -> bool:
        """An attempt runs and its workers have started (its rank 0 wrote the attempt's number)."""
        current = self.current
        if current is None or not current[1].is_alive():
            return False
        try:
            return (self.run_dir / STARTED_FILE).read_text() == str(current[0].number)
        except OSError:
            return False

    def request_stop(self, why: str) -> bool:
        """End the run: if workers train, they save a checkpoint at their next step and stop (True); otherwise the
        attempt that is starting, or the planning of the next, ends now (False)."""
        self.stop_saves = self.training()
        if self.stop_saves:
            self._ask_workers_to_stop(why)
        self.stop.set()
        return self.stop_saves

    def _ask_workers_to_stop(self, why: str) -> None:
        write_atomic(self.run_dir / store.STOP_FILE, f"{why} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    # ------------------------------------------------------------ the attempts

    def supervise(self) -> list[Attempt]:
        c, cl = self.c, self.c.cluster
        failures, reason, patient = 0, "start", True
        capacity = nodes.table_capacity(cl)  # nothing has failed yet: Ray's table is right
        while not self.stop.is_set():
            if self.blocked and not capacity.nodes <= self.blocked.nodes:
                self.blocked = None  # a node joined since that size did not start: it may now
            workers = plan_workers(c, capacity.workers, self._ceiling(capacity), patient)
            waits = workers > capacity.workers
            attempt = Attempt(len(self.attempts) + 1, config_for_workers(c, workers) if is_elastic(c) else c, reason,
                              at_launch_layout=workers == cl.num_workers,
                              start_timeout=cl.start_timeout_seconds + (cl.replace_wait_seconds if waits else 0),
                              avoid_nodes=capacity.silent)
            self.attempts.append(attempt)
            if attempt.number > 1:
                log.warning("attempt %d (%s): %s", attempt.number, attempt.reason, attempt.describe())
            if waits:
                log.warning("attempt %d waits up to %gs for resources: the alive nodes hold %d workers",
                            attempt.number, attempt.start_timeout, capacity.workers)
            outcome, error = self._run(attempt)
            if outcome == "finished" or self.stop.is_set():
                break
            if outcome == "grow":
                reason, patient = "grow: capacity returned", False  # to what is there: it trains meanwhile
                capacity = nodes.live_capacity(cl, cl.node_probe_seconds, self.stop)
                continue
            what = _what_failed(error)
            if outcome == "start_failed" and is_elastic(c) and workers > smallest_size(c):
                self.blocked = Blocked(workers, capacity.nodes)
                log.warning("%s; planning below %d workers (nothing trained: this spends no failure)", what, workers)
                reason, patient = f"{workers} workers did not start", False
            else:
                failures += 1
                if failures > cl.max_failures:
                    log.error("%s; that is failure %d, more than cluster.max_failures=%d: giving up", what, failures,
                              cl.max_failures)
                    raise error
                log.warning("%s; restarting from the newest checkpoint (failure %d of cluster.max_failures=%d)", what,
                            failures, cl.max_failures)
                reason, patient = f"after failure {failures}: {what}", outcome != "start_failed"
            capacity = nodes.live_capacity(cl, cl.node_probe_seconds, self.stop)
        if self.stop.is_set() and not self.stop_saves:
            log.warning("the run stopped with no worker group training (after %d attempt(s))", len(self.attempts))
        return self.attempts

    def _ceiling(self, capacity: nodes.Capacity) -> int:
        blocked = self.blocked
        return blocked.workers - 1 if blocked and capacity.nodes <= blocked.nodes else self.c.cluster.num_workers

    def _run(self, attempt: Attempt) -> tuple[str, BaseException | None]:
        """One attempt in a thread of its own; returns how it ended: finished, grow, stopped, start_failed or
        failed (with the error). Other errors (a bad checkpoint, a config problem) are raised."""
        (self.run_dir / STARTED_FILE).unlink(missing_ok=True)
        (self.run_dir / store.STOP_FILE).unlink(missing_ok=True)  # a grow's request, done with
        groups_before = set(ray.util.placement_group_table())
        box: dict = {}

        def run() -> None:
            try:
                fit = self.prepare(attempt)
                if not self.stop.is_set():
                    box["fit_at"] = time.monotonic()
                    fit()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                box["error"] = e

        thread = threading.Thread(target=run, name=f"distlm-attempt-{attempt.number}", daemon=True)
        thread.start()
        self.current = attempt, thread
        grow, watcher, ended, ending_since = threading.Event(), None, None, 0.0
        try:
            while thread.is_alive():
                thread.join(0.5)  # the main thread stays free for the signal handlers
                if not attempt.started and not ended and self.training():
                    attempt.started = True
                    watcher = self._watch_for_capacity(attempt, grow) if is_elastic(self.c) else None
                if not ended:
                    ended, ending_since = self._reason_to_end(attempt, box.get("fit_at")), time.monotonic()
                if ended:
                    if "fit_at" not in box and ended == "stopped":
                        break  # still preparing (a conversion): nothing of Ray Train's to end
                    kill_train_controller()  # fit() raises at once; again each poll until the controller exists
                    if ended == "stopped" and time.monotonic() - ending_since > 5:
                        break  # the process exits next, and Ray ends what this job started
        finally:
            self.current = None
            if watcher:
                watcher.set()
        error = box.get("error")
        if ended == "stopped":
            remove_placement_groups(groups_before)
            return "stopped", None
        if error is None:
            return ("grow" if grow.is_set() else "finished"), None
        if isinstance(ended, StartTimeout) or is_start_failure(error):
            remove_placement_groups(groups_before)
            return "start_failed", ended if isinstance(ended, StartTimeout) else error
        if isinstance(error, failure_types()):
            remove_placement_groups(groups_before)
            return "failed", error
        raise error

    def _reason_to_end(self, attempt: Attempt, fit_at: float | None) -> str | StartTimeout | None:
        """Why the driver ends a running attempt now: a stop that has nothing to save, or a start that has taken
        longer than its bound (Ray Train's placement wait, then as long again until rank 0 runs)."""
        if self.stop.is_set() and not self.stop_saves:
            return "stopped"
        limit = attempt.start_timeout + self.c.cluster.start_timeout_seconds
        if attempt.started or fit_at is None or time.monotonic() - fit_at <= limit:
            return None
        return StartTimeout(f"attempt {attempt.number}'s workers did not start training within {limit:g}s "
                            f"(cluster.start_timeout_seconds)")

    def _watch_for_capacity(self, attempt: Attempt, grow: threading.Event) -> threading.Event | None:
        """A thread that sets `grow` and stops the workers once more workers would make a larger layout."""
        c, cl = self.c, self.c.cluster
        running = attempt.config.cluster.num_workers
        if running >= cl.num_workers:
            return None
        stop = threading.Event()

        def larger(capacity: nodes.Capacity) -> int:
            workers = plan_workers(c, capacity.workers, self._ceiling(capacity), wait_for_nodes=False)
            return workers if workers > running else 0

        def watch() -> None:
            while not stop.wait(cl.elastic_check_seconds):
                if not larger(nodes.table_capacity(cl)):  # a cheap look first; then ask the nodes themselves
                    continue
                capacity = nodes.live_capacity(cl, cl.node_probe_seconds, stop)
                if larger(capacity) and not stop.is_set():
                    log.warning("capacity for %d workers is back (running %d): the workers save at the next step "
                                "and the run goes on at the larger size", min(capacity.workers, cl.num_workers),
                                running)
                    grow.set()
                    self._ask_workers_to_stop(f"grow from {running} to {larger(capacity)} workers")
                    return

        threading.Thread(target=watch, name="distlm-elastic-watch", daemon=True).start()
        return stop


def _what_failed(e: BaseException) -> str:
    from ray.exceptions import RayActorError

    if isinstance(e, StartTimeout):
        return str(e)
    if is_start_failure(e):
        return f"the worker group did not start ({_first_line(e.controller_failure)})"
    if isinstance(e, RayActorError):
        return f"Ray Train's controller died ({type(e).__name__})"
    failures = getattr(e, "worker_failures", None) or {}  # a WorkerGroupError: rank -> what it raised
    causes = "; ".join(f"rank {rank}: {type(err).__name__}: {_first_line(err)}" for rank, err in sorted(failures.items()))
    return f"the worker group failed ({causes or f'{type(e).__name__}: {_first_line(e)}'})"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""
