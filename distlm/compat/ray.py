"""Reaches into Ray 2.60's private API (pinned in pyproject.toml). tests/test_compat.py guards each: it fails
when an upgrade moves the names used here."""

from __future__ import annotations

import logging
import os
import signal

import ray

log = logging.getLogger(__name__)

WRITTEN_FOR = "2.60.0"


def stop_local_cluster() -> None:
    """ray.shutdown() of a cluster this process started, less its needless wait.

    Gap: Ray stops its processes one by one and gives each 1 s to exit after SIGTERM; the autoscaler monitor
    takes all of that second before it is killed (1.0 of 1.4 s). A local cluster never autoscales: kill it first,
    through the node handle Ray keeps of the processes it started."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        info.process.kill()
    ray.shutdown()


def remove_placement_groups(created_after: set[str]) -> None:
    """Remove the placement groups this job created since `created_after` (ray.util.placement_group_table()
    keys then) that are still there.

    Gap: placement groups created by Ray Train's controller are owned by the job (the driver, which lives on).
    When the controller is killed, Ray Train's cleaner actor is meant to remove them, but it needs Ray's state
    API (which fails, e.g., when two Ray clusters share a machine), and the next attempt would wait for their
    resources forever. A PlacementGroup handle is made from the table's hex id (`ray._raylet.PlacementGroupID`)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()  # a placement group's id ends with its job's
    for group, info in ray.util.placement_group_table().items():
        if group not in created_after and group.endswith(job) and info["state"] != "REMOVED":
            log.info("removing placement group %s of the failed attempt", group)
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def set_start_timeout(seconds: float) -> None:
    """Bound Ray Train's wait for a worker group's placement group in the next fit() of this process.

    Gap: Ray Train reads its start-up timeout only from this environment variable, which fit() forwards from the
    driver's environment to the controller it creates (train/v2/_internal/constants.py, ENV_VARS_TO_PROPAGATE);
    ScalingConfig has no field for it."""
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"


def is_start_failure(error: BaseException) -> bool:
    """Whether fit() raised because its worker group could not start: no placement in time, a worker that died
    while starting, or more resources than the autoscaling cluster's node types can ever hold.

    Gap: Ray Train reports these as a ControllerError around exceptions of its private
    `ray.train.v2._internal.exceptions` module (with FailureConfig(controller_failure_limit=0), else it retries
    them forever at the same size)."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import (InsufficientClusterResourcesError, WorkerGroupStartupFailedError,
                                                   WorkerGroupStartupTimeoutError)

    return isinstance(error, ControllerError) and isinstance(
        error.controller_failure,
        (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError, InsufficientClusterResourcesError))


def kill_train_controller() -> bool:
    """SIGKILL this job's Ray Train controller; fit() then raises ActorDiedError at once and the workers, owned by
    the controller, die with it. Returns whether one was found and killed.

    Gap: Ray Train has no public way to end a fit() from another thread: its `abort` is on the controller's handle,
    which fit() keeps to itself (and, in the main thread only, wires to SIGINT), and an abort waits for a worker
    group that is still starting. The controller runs on the driver's node (fit() pins it there), so its process
    is this machine's; `ray._private.state.actors` lists it with its PID."""
    from ray._private import state

    context = ray.get_runtime_context()
    killed = False
    for actor in state.actors(job_id=context.job_id, actor_state_name="ALIVE").values():
        if actor["ActorClassName"] == "TrainController" and actor["Address"]["NodeID"] == context.get_node_id():
            log.info("ending Ray Train's controller (pid %d)", actor["Pid"])
            try:
                os.kill(actor["Pid"], signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
    return killed
