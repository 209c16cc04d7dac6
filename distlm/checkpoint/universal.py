"""Checkpoints that outlive their layout: DeepSpeed universal checkpoints under one-process names.

A checkpoint holds one file per rank of the layout that wrote it (tp x pp x dp). To resume it at another
layout, or to export it, DeepSpeed's `ds_to_universal` merges those shards into one folder per parameter,
`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`: TP slices concatenated, ZeRO partitions joined, vocabulary
padding dropped, by the rules the model declares (`parallelize.universal_checkpoint_info`). distlm keeps
that folder in the checkpoint, `<tag>/universal/`, with each parameter under its one-process Llama name;
a layout about to load it links its own names (`3.layers.2.mlp.up_proj.weight`) to those.

The conversion is its own step, before any training rank exists (`resume.prepare`, `distlm checkpoint
reshape`): on Ray, one task runs DeepSpeed's converter and fans its two parallel phases out as Ray tasks
(extract: one task per optimizer shard file; merge: the parameters spread over tasks). It writes into a
temporary folder that is renamed into place with a `complete.json` record last: a folder without it was
interrupted, and is removed and redone, as are temporary folders left by a killed conversion.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from distlm.config import describe_layout

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
COMPLETE_FILE = "complete.json"  # written last into the temporary folder: the conversion finished
_TMP_PREFIX = f".{UNIVERSAL_DIR}.tmp"


def layout_of(config: dict[str, Any]) -> dict[str, int]:
    """tp, pp, cp, dp and ZeRO stage of a composed config (as saved in a checkpoint's run state; cp is 1 in
    checkpoints written before context parallelism existed)."""
    par, workers = config["parallel"], config["cluster"]["num_workers"]
    cp = par.get("cp", 1)
    return {"tp": par["tp"], "pp": par["pp"], "cp": cp, "dp": workers // (par["tp"] * par["pp"] * cp),
            "zero_stage": par["zero_stage"]}


def describe(layout: dict[str, int]) -> str:
    return f"{describe_layout(layout['tp'], layout['pp'], layout.get('cp', 1), layout['dp'])}, ZeRO-{layout['zero_stage']}"


def needs_universal(was: dict[str, int], now: dict[str, int]) -> bool:
    """Whether a checkpoint written at layout `was` must go through its universal form to be loaded at
    `now` (both `layout_of`): DeepSpeed's own loading needs the same TP, PP and ZeRO stage, and with ZeRO >= 1
    (optimizer states partitioned over data-parallel ranks, which include the context-parallel ones) the same
    DP and CP sizes."""
    if was == now:
        return False
    return was["zero_stage"] > 0 or (was["tp"], was["pp"], was["zero_stage"]) != (now["tp"], now["pp"], now["zero_stage"])


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / UNIVERSAL_DIR / COMPLETE_FILE).is_file()


def convert(tag_dir: Path, on_ray: bool = False) -> Path:
    """`tag_dir/universal`, made once; returns it. `on_ray`: the converter and its parallel phases run as
    Ray tasks (ray must be initialized) and this process only waits; otherwise all runs in this process."""
    tag_dir = Path(tag_dir)
    if is_complete(tag_dir):
        return tag_dir / UNIVERSAL_DIR
    if not any(tag_dir.glob("*optim_states.pt")):
        raise ValueError(f"checkpoint {tag_dir} has no ZeRO optimizer shards (written with ZeRO-0): it can only be "
                         f"loaded with the tensor/pipeline layout and ZeRO stage that wrote it")
    if not on_ray:
        return _convert_locked(tag_dir, run_tasks=None)
    import ray
    import ray.exceptions

    memory = task_memory(tag_dir)
    task = ray.remote(num_cpus=1, max_calls=1, memory=memory)(_convert_locked)
    try:
        return ray.get(task.remote(tag_dir, run_tasks=functools.partial(_ray_tasks, memory=memory)))
    except ray.exceptions.RayTaskError as e:
        cause: BaseException = e
        while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
            cause = cause.cause
        raise cause from None


def _convert_locked(tag_dir: Path, run_tasks: Callable | None) -> Path:
    """The conversion under a lock (one converter per checkpoint at a time): leftovers of an interrupted
    one are removed first, then ds_to_universal writes a temporary folder, which is published by rename."""
    from distlm.compat.deepspeed import run_ds_to_universal
    from distlm.model.parallelize import canonical_name

    out = tag_dir / UNIVERSAL_DIR
    with open(tag_dir / f".{UNIVERSAL_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if is_complete(tag_dir):  # another converter finished while this one waited
            return out
        for leftover in [*tag_dir.glob(f"{_TMP_PREFIX}*"), out]:
            if leftover.exists():
                log.warning("removing %s, left by an interrupted conversion", leftover)
                shutil.rmtree(leftover)
        tmp = tag_dir / f"{_TMP_PREFIX}{os.getpid()}"
        log.info("converting %s to a universal checkpoint%s", tag_dir, " (Ray tasks)" if run_tasks else "")
        start = time.perf_counter()
        record: dict[str, Any] = {"tasks": []}
        try:
            run_ds_to_universal(tag_dir, tmp, functools.partial(run_tasks, record=record["tasks"]) if run_tasks else None)
            for param_dir in (tmp / "zero").iterdir():
                name = canonical_name(param_dir.name)
                if param_dir.is_dir() and name != param_dir.name:
                    param_dir.rename(param_dir.with_name(name))
            record.update(seconds=round(time.perf_counter() - start, 2), converter_peak_rss_mib=_peak_rss_mib())
            (tmp / COMPLETE_FILE).write_text(json.dumps(record, indent=1))
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            (tag_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer to the tmp name
    log.info("universal form of %s made in %.1fs", tag_dir, record["seconds"])
    return out


def task_memory(tag_dir: Path) -> int:
    """Bytes of memory a conversion task asks Ray for, so that Ray places it on a node that has them: the
    extract phase loads one rank's optimizer shard whole (torch.load), twice its file size at most; the merge
    phase holds one parameter's slices, less. Refused at once when no node of the cluster has that much."""
    import ray

    largest = max(p.stat().st_size for p in Path(tag_dir).glob("*optim_states.pt"))
    need = 2 * largest + 2**28  # + the interpreter, torch and DeepSpeed
    most = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if need > most:
        raise MemoryError(f"converting {tag_dir} needs a node with {need / 2**30:.1f} GiB of memory for one task "
                          f"(twice its largest optimizer shard), and the largest node of the Ray cluster offers "
                          f"{most / 2**30:.1f} GiB")
    return need


def _ray_tasks(work: Callable, items: list, record: list, memory: int) -> list:
    """DeepSpeed's parallel phase as Ray tasks, each asking for `memory`: at most one per CPU of the cluster,
    each a fresh process (its memory is returned when it ends) doing every n-th item; the results in the
    items' order."""
    import ray

    items = list(items)  # DeepSpeed passes a list, or a set of names (ZeRO-3 merge)
    if not items:
        return []
    parts = max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
    run = ray.remote(num_cpus=1, max_calls=1, memory=memory)(_run_items)
    work_ref = ray.put(work)
    done = ray.get([run.remote(work_ref, items[i::parts]) for i in range(parts)])
    record.append({"items": len(items), "tasks": parts, "peak_rss_mib": [rss for _, rss in done]})
    results: list = [None] * len(items)
    for i, (part, _) in enumerate(done):
        results[i::parts] = part
    return results


def _run_items(work: Callable, items: list) -> tuple[list, float]:
    return [work(item) for item in items], _peak_rss_mib()


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def link_names(universal_dir: Path, names: Iterable[str]) -> None:
    """Make the universal folder readable under this layout's parameter names (idempotent; every rank links
    its own parameters)."""
    from distlm.model.parallelize import canonical_name

    zero = Path(universal_dir) / "zero"
    links = []
    for name in names:
        target = canonical_name(name)
        if target != name:
            if not (zero / target).is_dir():
                raise FileNotFoundError(f"{universal_dir} has no parameter {target} (needed for {name})")
            links.append((target, zero / name))
    for target, link in links:
        try:
            os.symlink(target, link)
        except FileExistsError:
            pass

