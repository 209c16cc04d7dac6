"""`distlm train` on the driver: check everything, then start one Ray Train worker per GPU (or CPU process)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from distlm import cluster
from distlm.config import Config, ConfigError, raise_if, to_dict, validate_train
from distlm.data.mixture import main_dir
from distlm.train import checkpoint, universal
from distlm.train.progress import ProgressBar, summarize

log = logging.getLogger(__name__)


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (Ray has already set up the process group's env)."""
    import torch

    from distlm.train.trainer import Trainer

    import ray.train

    c: Config = loop_config["config"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(c.cluster.cpus_per_worker)
    cluster.check_worker_node(c)  # TP group within a node, shared run_dir and data.dir
    rank = ray.train.get_context().get_world_rank()
    pids = Path(c.run_dir) / "pids"  # which process is which rank, for people and tests
    pids.mkdir(exist_ok=True)
    checkpoint.write_atomic(pids / f"rank{rank}.pid", str(os.getpid()))
    # After a worker died, Ray Train restarts the whole group with this same config: it must continue from
    # this run's own newest checkpoint, not go back to trainer.resume=PATH or start over (resume=never).
    own = checkpoint.newest_since(Path(c.run_dir) / "checkpoints", loop_config["checkpoints_at_launch"])
    if own is not None and c.trainer.resume != "auto":
        if rank == 0:
            log.info("restarted: resuming from this run's newest checkpoint %s, not trainer.resume=%s", own,
                     c.trainer.resume)
        c.trainer.resume = str(own)
    Trainer(c).fit()


def check_compatible(saved: checkpoint.RunState, c: Config, tokenizer_sha256: str, where: Path) -> None:
    """Never silently continue a different model or tokenizer."""
    now = to_dict(c)["model"]
    was = saved.config.get("model", {})
    changed = [f"model.{k}: checkpoint {was.get(k)!r} vs config {v!r}"
               for k, v in now.items() if k not in ("init_std", "max_seq_len") and was.get(k) != v]
    if changed:
        raise ConfigError(f"checkpoint {where} was trained with a different model: {', '.join(changed)}; "
                          f"use the checkpoint's model settings, or trainer.resume=never to start over")
    if saved.tokenizer_sha256 != tokenizer_sha256:
        raise ConfigError(f"checkpoint {where} used tokenizer {saved.tokenizer_sha256[:12]} but data.dir={c.data.dir} "
                          f"has tokenizer {tokenizer_sha256[:12]}; train on the same tokenization, or "
                          f"trainer.resume=never to start over")


def check_layout_change(saved: checkpoint.RunState, c: Config, where: Path) -> None:
    """A checkpoint of another layout resumes through its universal form, which needs ZeRO optimizer shards."""
    if checkpoint.is_weights_only(where):
        return  # imported weights: any layout
    was, now = universal.layout_of(saved.config), universal.layout_of(to_dict(c))
    if not universal.needs_universal(saved.config, to_dict(c)):
        return
    if was["zero_stage"] == 0:
        raise ConfigError(f"checkpoint {where} was written at {universal.describe(was)}; resuming it at "
                          f"{universal.describe(now)} needs a checkpoint written with parallel.zero_stage>=1. "
                          f"Resume with parallel.tp={was['tp']} parallel.pp={was['pp']} parallel.zero_stage=0")
    if (was["zero_stage"] == 3) != (now["zero_stage"] == 3):
        raise ConfigError(f"checkpoint {where} was written with ZeRO-{was['zero_stage']}; DeepSpeed's universal "
                          f"checkpoints do not carry optimizer states between ZeRO-3 and ZeRO 1/2: resume with "
                          f"parallel.zero_stage={was['zero_stage']} (any tp/pp/dp)")
    log.info("checkpoint %s was written at %s; it resumes at %s through its universal form", where,
             universal.describe(was), universal.describe(now))


def check_mix(c: Config) -> None:
    """The sources of data.mix must be one tokenization: the same tokenizer (sha256) and seq_len as the first."""
    from distlm.data.shards import Manifest

    if not c.data.mix:
        return
    manifests = []
    for source in c.data.mix:
        try:
            manifests.append(Manifest.load(source.dir))
        except ValueError as e:
            raise ConfigError(f"data.mix source {source.name}: {e}") from None
    for source, manifest in zip(c.data.mix, manifests):
        if manifest.num_samples("train") == 0:
            raise ConfigError(f"data.mix source {source.name} ({source.dir}) has no training samples")
    first, first_manifest = c.data.mix[0], manifests[0]
    for source, manifest in zip(c.data.mix[1:], manifests[1:]):
        if manifest.tokenizer_sha256 != first_manifest.tokenizer_sha256:
            raise ConfigError(f"data.mix sources {first.name} ({first.dir}) and {source.name} ({source.dir}) were "
                              f"tokenized differently (tokenizer {first_manifest.tokenizer_sha256[:12]} vs "
                              f"{manifest.tokenizer_sha256[:12]}): preprocess both with the same data.tokenizer.path")
        if manifest.seq_len != first_manifest.seq_len:
            raise ConfigError(f"data.mix sources {first.name} ({first.dir}) and {source.name} ({source.dir}) hold "
                              f"samples of seq_len {first_manifest.seq_len} and {manifest.seq_len}: preprocess both "
                              f"with the same data.seq_len")


def check_before_launch(c: Config) -> None:
    """Everything that can be known on the driver fails here, before any worker starts."""
    from distlm.data.shards import Manifest

    raise_if(validate_train(c))
    check_mix(c)
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
    found = checkpoint.to_resume(c)
    if found is not None:
        saved = checkpoint.read_state(found[0] / found[1])
        check_compatible(saved, c, manifest.tokenizer_sha256, found[0] / found[1])
        check_layout_change(saved, c, found[0] / found[1])
        if saved.samples_seen % c.global_batch_size:
            raise ConfigError(f"checkpoint {found[0] / found[1]} stopped after {saved.samples_seen} samples, not a multiple "
                              f"of the global batch {c.global_batch_size} (trainer.micro_batch_size x grad_accum x "
                              f"data-parallel size): choose a global batch that divides it, e.g. the checkpoint's "
                              f"{saved.samples_seen // max(saved.step, 1)}")
    if manifest.num_samples("train") < c.global_batch_size:
        raise ConfigError(f"data.dir={c.data.dir} has {manifest.num_samples('train')} training samples, fewer than "
                          f"one global batch ({c.global_batch_size}); lower trainer.micro_batch_size or add data")


@contextmanager
def stop_on_signals(c: Config):
    """While training: SIGTERM (spot preemption, `ray job stop`) or SIGINT asks the workers, through a file in
    run_dir that rank 0 polls every step, to save a checkpoint at the next step and stop; training then
    ends normally. If the workers have not stopped within trainer.stop_grace_seconds the driver exits with
    status 1; a second signal stops waiting at once. Yields the list of signals received."""
    stop_file = Path(c.run_dir) / checkpoint.STOP_FILE
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
        log.warning("%s: the workers save a checkpoint at the next step and stop (waiting up to %gs)", name, grace)
        checkpoint.write_atomic(stop_file, f"{name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        timer.start()

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

    check_before_launch(c)
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
    cl = c.cluster
    cluster.connect(cl, cpus_needed=cl.num_workers * cl.cpus_per_worker)
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"config": c, "checkpoints_at_launch": checkpoint.snapshot(run_dir / "checkpoints")},
        scaling_config=cluster.scaling_config(cl),  # one worker per GPU, packed node by node
        run_config=RunConfig(name=c.run_name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cl.max_failures)),
    )
    start = time.perf_counter()
    with stop_on_signals(c) as signals, ProgressBar(run_dir, total_steps=c.trainer.stop_at_step or c.trainer.max_steps):
        trainer.fit()
    summary = summarize(run_dir)
    if signals:
        summary["stopped_by"] = signals[0]
        log.info("stopped by %s at step %d; resume with the same command", signals[0], summary["steps"])
    log.info("training finished in %.0fs: step %d, %s tokens seen, train loss %.4f, val loss %.4f; "
             "checkpoint %s; metrics %s", time.perf_counter() - start, summary["steps"],
             f"{summary['tokens_seen']:,}", summary["final_train_loss"], summary["final_val_loss"],
             summary["checkpoint"], summary["metrics"])
    return summary
