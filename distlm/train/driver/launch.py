"""`distlm train` on the driver: check everything, then start one Ray Train worker per GPU (or CPU process)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import yaml

from distlm import cluster
from distlm.checkpoint import store
from distlm.compat.ray import set_start_timeout
from distlm.config import Config, ConfigError, raise_if, to_dict
from distlm.data.loading.mixture import main_dir
from distlm.files import write_atomic
from distlm.plan import plan as plan_memory
from distlm.plan import verdict
from distlm.train import resume
from distlm.train.driver import nodes, supervisor
from distlm.train.driver.progress import ProgressBar, summarize
from distlm.train.worker.metrics import read_metrics
from distlm.validation import validate_train

log = logging.getLogger(__name__)


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (Ray has already set up the process group's env)."""
    import ray.train
    import torch

    from distlm.memory import limit_heap_retention
    from distlm.train.worker.trainer import Trainer

    c: Config = loop_config["config"]
    limit_heap_retention(c.cluster.malloc_mmap_threshold_kb)  # before the model: freed tensors go back to the OS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(c.cluster.cpus_per_worker)
    cluster.check_worker_node(c)  # TP group within a node, shared run_dir and data.dir
    rank = ray.train.get_context().get_world_rank()
    pids = Path(c.run_dir) / "pids"  # which process is which rank, for people and tests
    pids.mkdir(exist_ok=True)
    if rank == 0:  # the driver's sign that this attempt's workers have started (supervisor.Supervisor.training)
        write_atomic(Path(c.run_dir) / supervisor.STARTED_FILE, str(loop_config["attempt"]["attempt"]))
    write_atomic(pids / f"rank{rank}.pid", str(os.getpid()))
    Trainer(c, loop_config["resume"], attempt=loop_config["attempt"]).fit()  # both made on the driver


def check_before_launch(c: Config) -> resume.ResumePlan:
    """Everything that can be known on the driver fails here, before any worker starts; returns the resume plan."""
    from distlm.data.shards import Manifest

    raise_if(validate_train(c))
    memory = plan_memory(c)  # the planner's verdict, as `distlm plan` prints it: a layout that cannot fit never starts
    if not memory.fits:
        raise ConfigError("\n".join(["the run does not fit (distlm plan):", *verdict(c, memory),
                                     "(the budgets: cluster.host_mem_gb, cluster.gpu_mem_gb, cluster.plan_headroom)"]))
    try:
        manifest = Manifest.load(main_dir(c.data))
    except ValueError as e:  # a manifest from an older distlm, or unreadable
        raise ConfigError(f"data.dir: {e}") from None
    if manifest.vocab_size > c.model.vocab_size:
        raise ConfigError(f"the tokenizer in data.dir={c.data.dir} has {manifest.vocab_size} tokens but "
                          f"model.vocab_size={c.model.vocab_size}; set model.vocab_size>={manifest.vocab_size}")
    if manifest.seq_len != c.data.seq_len:
        raise ConfigError(f"data.dir={c.data.dir} holds samples of seq_len {manifest.seq_len} but "
                          f"data.seq_len={c.data.seq_len}; set data.seq_len={manifest.seq_len} or preprocess again")
    if c.trainer.doc_masking and not manifest.doc_boundaries:
        raise ConfigError(f"trainer.doc_masking=true needs document boundaries, which data.dir={c.data.dir} does not "
                          f"store: preprocess it with data.keep_doc_boundaries=true, or set trainer.doc_masking=false")
    plan = resume.plan_resume(c, manifest.tokenizer_sha256)
    log.info("the run starts from %s", plan.describe())
    if manifest.num_samples("train") < c.global_batch_size:
        raise ConfigError(f"data.dir={c.data.dir} has {manifest.num_samples('train')} training samples, fewer than "
                          f"one global batch ({c.global_batch_size}); lower trainer.micro_batch_size or add data")
    return plan


@contextmanager
def stop_on_signals(c: Config, run: supervisor.Supervisor):
    """While the run goes on, SIGTERM (spot preemption, `ray job stop`) or SIGINT ends it:

    - workers that train are asked, through a file in run_dir that rank 0 polls every step, to save a checkpoint
      at the next step and stop; training then ends normally. If they have not stopped within
      trainer.stop_grace_seconds the driver exits with status 1;
    - with no worker group training (one starting, or none between attempts) the run ends within seconds: there
      is nothing to save, and the newest checkpoint is where the same command resumes.

    A second signal stops waiting at once. Yields the list of signals received."""
    stop_file = Path(c.run_dir) / store.STOP_FILE
    stop_file.unlink(missing_ok=True)  # left by a run that was killed before it could clean up
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield received
        return
    grace = c.trainer.stop_grace_seconds

    def give_up() -> None:
        log.error("the workers did not save and stop within trainer.stop_grace_seconds=%g; exiting", grace)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(grace, give_up)
    timer.daemon = True

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if received:
            raise KeyboardInterrupt(f"second signal ({name}) while waiting for the workers to stop")
        received.append(name)
        if run.request_stop(name):
            log.warning("%s: the workers save a checkpoint at the next step and stop (waiting up to %gs)", name, grace)
            timer.start()
        else:
            latest = store.find_latest(Path(c.run_dir) / "checkpoints")
            log.warning("%s while no worker group is training: the run stops now, with nothing to save; the same "
                        "command resumes from %s", name, f"checkpoint {latest}" if latest else "the start")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop_file.unlink(missing_ok=True)


def train(c: Config) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    plan = check_before_launch(c)
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cl = c.cluster
    cluster.connect(cl, cpus_needed=cl.num_workers * cl.cpus_per_worker)
    start = time.perf_counter()

    def prepare(attempt: supervisor.Attempt) -> Callable[[], None]:
        ac = attempt.config
        # A restart or a resize: this run's newest checkpoint (or the launch's start) at the layout it has now.
        attempt_plan = plan if attempt.number == 1 and attempt.at_launch_layout else resume.replan(ac, plan)
        if attempt.number > 1:
            log.info("attempt %d starts from %s", attempt.number, attempt_plan.describe())
        resume.prepare(attempt_plan)  # a universal conversion, on Ray tasks, before any training rank exists
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(ac), sort_keys=False))
        trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"config": ac, "resume": attempt_plan,
                               "attempt": {"attempt": attempt.number, "workers": ac.cluster.num_workers,
                                           "grad_accum": ac.trainer.grad_accum}},
            # One worker per GPU, packed node by node, off the nodes that did not answer the driver's probe.
            scaling_config=cluster.scaling_config(ac.cluster, label_selector=nodes.avoid_selector(attempt.avoid_nodes)),
            # Restarts are the driver's (supervisor.Supervisor): one budget for every failure, the controller's
            # too, and a start that does not come within the attempt's timeout is ended, not retried at its size.
            run_config=RunConfig(name=c.run_name, storage_path=str(run_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=0, controller_failure_limit=0,
                                                              max_preemption_failures=0)),
        )

        def fit() -> None:
            set_start_timeout(attempt.start_timeout)  # read by the controller this fit() creates
            with ProgressBar(run_dir, total_steps=c.trainer.stop_at_step or c.trainer.max_steps):
                trainer.fit()

        return fit

    run = supervisor.Supervisor(c, prepare)
    with stop_on_signals(c, run) as signals:
        attempts = run.supervise()
    if signals and not read_metrics(run_dir):
        log.info("stopped by %s before any step; the same command starts the run", signals[0])
        return {"steps": 0, "attempts": len(attempts), "stopped_by": signals[0]}
    summary = summarize(run_dir)
    summary["attempts"] = len(attempts)
    if signals:
        summary["stopped_by"] = signals[0]
        log.info("stopped by %s at step %d; resume with the same command", signals[0], summary["steps"])
    log.info("training finished in %.0fs: step %d, %s tokens seen, train loss %.4f, val loss %.4f; "
             "checkpoint %s; metrics %s", time.perf_counter() - start, summary["steps"],
             f"{summary['tokens_seen']:,}", summary["final_train_loss"], summary["final_val_loss"],
             summary["checkpoint"], summary["metrics"])
    return summary
