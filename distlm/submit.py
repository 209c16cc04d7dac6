"""`distlm submit [--address URL] [--wait] COMMAND [overrides]`: run a distlm command as a job on a running
Ray cluster, through Ray's Job Submission API.

The working directory (this checkout: code and conf/) is uploaded with the job and the command runs there
on the head node, as `python -m distlm.cli COMMAND overrides` (an export asks for a worker node with the memory
it needs instead, `job_resources`). The config is composed and checked here
first, so a typo fails before anything is uploaded. Secrets (cluster.submit_env, e.g. WANDB_API_KEY) go
from this shell into the job's environment only: their values are never printed, and distlm never writes
them into configs, logs, checkpoints or wandb.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distlm.config import CONF_DIR, CheckpointError, Config, ConfigError, ModelConfig, load_config, raise_if
from distlm.validation import validate_cluster, validate_export, validate_layout, validate_model

COMMANDS = ("preprocess", "train", "export", "generate", "eval")
# Written by the commands or installed locally; never worth uploading (Ray also honours .gitignore).
UPLOAD_EXCLUDES = ["/.git/", "/.venv/", "/build/", "/runs/", "/data/", "/outputs/", "/wandb/", "__pycache__/",
                   ".pytest_cache/", "*.egg-info/"]
# Path keys each command reads or writes on the cluster.
PATH_KEYS = {
    "preprocess": ("data.inputs", "data.dir", "data.tokenizer.path"),
    "train": ("run_dir", "data.dir", "trainer.resume"),
    "export": ("export.checkpoint_dir", "export.out_dir"),
    "generate": ("generate.model_dir",),
    "eval": ("data.dir", "eval.checkpoint", "eval.model_dir", "eval.out"),
}


def compose_raw(overrides: list[str]) -> DictConfig:
    """The composed config before paths are made absolute (against this machine's cwd)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)


def relative_paths(raw: DictConfig, command: str) -> list[str]:
    """Path settings that would resolve inside the job's temporary copy of the working directory.

    That copy lives on the head node only and is replaced by the next upload: outputs written there are
    lost and other nodes never see them, so on a cluster every path must be absolute (on shared storage)."""
    found = []
    for key in PATH_KEYS[command]:
        value = OmegaConf.select(raw, key)
        for path in value if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]:
            if path is None or (key == "trainer.resume" and path in ("auto", "never")):
                continue
            if not (str(path).startswith(("/", "~")) or "://" in str(path)):
                found.append(f"{key}={path}")
    return found


def check_before_submit(command: str, overrides: list[str]) -> Config:
    """Everything that can be checked without the cluster's files. Raises ConfigError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from distlm.cli import check_overrides

    check_overrides(command, overrides)   # "did you mean" for a mistyped key
    try:
        raw = compose_raw(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config: {e}".strip()) from None
    c = load_config(raw)
    problems = validate_cluster(c)
    if command == "train":
        problems += validate_model(c.model) + validate_layout(c)
    if command == "export":
        problems += validate_export(c)
    relative = relative_paths(raw, command)
    if relative:
        problems.append(f"relative paths {relative} would point into the job's temporary copy of the working "
                        f"directory on the head node; give absolute paths on storage every node mounts, e.g. "
                        f"run_dir=/fsx/runs/{c.run_name} data.dir=/fsx/data/NAME (see docs/cluster.md)")
    raise_if(problems)
    return c


def job_resources(command: str, c: Config) -> dict[str, Any]:
    """What the job's driver asks Ray for. An export runs in the driver and needs memory for its largest
    output file and a few tensors: asking for it (and a CPU, which the head does not offer) places it on a
    worker node that has both. The model is the checkpoint's when this machine can read it, else `model.*`."""
    if command != "export":
        return {}
    from distlm.checkpoint.store import read_state
    from distlm.checkpoint.weights import find_checkpoint
    from distlm.hf.export import export_memory_bytes

    model = c.model
    try:
        model = ModelConfig.from_dict(read_state(find_checkpoint(Path(c.export.checkpoint_dir), c.export.tag)).config["model"])
    except (OSError, CheckpointError):
        print(f"  {c.export.checkpoint_dir} is not readable here: sizing the export's memory by model.* instead")
    return {"entrypoint_num_cpus": 1, "entrypoint_memory": export_memory_bytes(model, c.export.max_shard_mb)}


def job_env(names: list[str]) -> dict[str, str]:
    """Values of the named variables that are set in this shell (secrets included: they travel only in the
    job's runtime environment)."""
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def submit(command: str, overrides: list[str], address: str, working_dir: Path, extra_env: list[str] = (),
           job_id: str | None = None) -> str:
    """Submit `distlm COMMAND overrides` to the cluster's job server at `address`; return the job id."""
    from ray.job_submission import JobSubmissionClient

    c = check_before_submit(command, overrides)
    env = job_env([*c.cluster.submit_env, *extra_env])
    if command == "train":
        # `ray job stop` SIGTERMs the driver, then SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S (Ray's default:
        # 3 s): leave the workers the time to save their checkpoint (trainer.stop_grace_seconds) first.
        env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(int(c.trainer.stop_grace_seconds) + 60))
    entrypoint = shlex.join(["python", "-m", "distlm.cli", command, *overrides])
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES, "env_vars": env}
    resources = job_resources(command, c)
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                               metadata={"distlm_command": command, "run_name": c.run_name}, **resources)
    print(f"submitted job {job_id} to {address}: distlm {command} {shlex.join(overrides)}")
    if resources:
        print(f"  runs on a node with {resources['entrypoint_num_cpus']} CPU and "
              f"{resources['entrypoint_memory'] / 2**30:.1f} GiB free (not the head, which offers no CPU)")
    if env:
        print(f"  environment passed to the job: {', '.join(sorted(env))} (values not shown)")
    print(f"  follow its logs:  ray job logs --address {address} --follow {job_id}")
    print(f"  its status:       ray job status --address {address} {job_id}")
    print(f"  stop it:          ray job stop --address {address} {job_id}")
    if command == "train":
        print(f"  metrics:          {c.run_dir}/metrics.jsonl (`distlm report {c.run_dir}` where that storage is "
              f"mounted); W&B project '{c.logger.project}', run '{c.logger.name or c.run_name}'")
    return job_id


def follow(address: str, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: ray job stop --address {address} {job_id}")
        raise SystemExit(130) from None
    status = client.get_job_status(job_id)
    for _ in range(60):  # the log stream can end a moment before the job's status is final
        if status.is_terminal():
            break
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"job {job_id} {status.value}")
    return status.value


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="distlm submit", description="Run a distlm command as a job on a running Ray cluster.",
        epilog="example: distlm submit --address http://127.0.0.1:8265 --wait train cluster=gpu "
               "run_dir=/fsx/runs/llama data.dir=/fsx/data/web")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="the cluster's job server, http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 1 if it failed")
    parser.add_argument("--working-dir", type=Path, default=CONF_DIR.parent,
                        help="uploaded with the job; must hold distlm/ and conf/ (default: this distlm checkout)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="also pass this environment variable to the job (repeatable)")
    parser.add_argument("--job-id", default=None, help="a submission id of your own (default: generated by Ray)")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, as for the command itself")
    args = parser.parse_args(argv)
    if not (args.working_dir / "distlm").is_dir() or not (args.working_dir / "conf").is_dir():
        parser.error(f"--working-dir {args.working_dir} holds no distlm/ and conf/: point it at a distlm checkout")
    if not args.address:
        parser.error("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS (for a `ray up` "
                     "cluster, run `ray dashboard cluster/gpu.yaml` and use http://127.0.0.1:8265)")
    try:
        job_id = submit(args.command, args.overrides, args.address, args.working_dir, args.env, args.job_id)
    except ConfigError as e:
        print(f"distlm submit: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.wait and follow(args.address, job_id) != "SUCCEEDED":
        raise SystemExit(1)
