"""Reaches into Ray 2.60's private API (pinned in pyproject.toml). tests/test_compat.py guards each: it fails
when an upgrade moves the names used here."""

from __future__ import annotations

import logging

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
