"""`distlm train` on the driver: check everything, then start one Ray Train worker per GPU (or CPU process)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from distlm import cluster
from distlm.config import Config, ConfigError, raise_if, to_dict, validate_train
from distlm.train import checkpoint
from distlm.train.metrics import ProgressBar, summarize

log = logging.getLogger(__name__)


def _worker_main(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (Ray has already set up the process group's env)."""
    import torch

    from distlm.train.trainer import Trainer

    c: Config = loop_config["config"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(c.cluster.cpus_per_worker)
    cluster.check_worker_node(c)  # TP group within a node, shared run_dir and data.dir
    Trainer(c).fit()


def check_compatible(saved: checkpoint.RunState, c: Config, tokenizer_sha256: str, where: Path) -> None:
    """Never silently continue a different model or tokenizer."""
    now = to_dict(c)["model"]
    was = saved.config.get("model", {})
    changed = [f"model.{k}: checkpoint {was.get(k)!r} vs config {v!r}"
               for k, v in now.items() if k != "init_std" and was.get(k) != v]
    if changed:
        raise ConfigError(f"checkpoint {where} was trained with a different model: {', '.join(changed)}; "
                          f"use the checkpoint's model settings, or trainer.resume=never to start over")
    if saved.tokenizer_sha256 != tokenizer_sha256:
        raise ConfigError(f"checkpoint {where} used tokenizer {saved.tokenizer_sha256[:12]} but data.dir={c.data.dir} "
                          f"has tokenizer {tokenizer_sha256[:12]}; train on the same tokenization, or "
                          f"trainer.resume=never to start over")


def check_before_launch(c: Config) -> None:
    """Everything that can be known on the driver fails here, before any worker starts."""
    from distlm.data.shards import Manifest

    raise_if(validate_train(c))
    try:
        manifest = Manifest.load(c.data.dir)
    except ValueError as e:  # a manifest from an older distlm, or unreadable
        raise ConfigError(f"data.dir: {e}") from None
    if manifest.vocab_size > c.model.vocab_size:
        raise ConfigError(f"the tokenizer in data.dir={c.data.dir} has {manifest.vocab_size} tokens but "
                          f"model.vocab_size={c.model.vocab_size}; set model.vocab_size>={manifest.vocab_size}")
    if manifest.seq_len != c.data.seq_len:
        raise ConfigError(f"data.dir={c.data.dir} holds samples of seq_len {manifest.seq_len} but "
                          f"data.seq_len={c.data.seq_len}; set data.seq_len={manifest.seq_len} or preprocess again")
    found = checkpoint.to_resume(c)
    if found is not None:
        check_compatible(checkpoint.read_state(found[0] / found[1]), c, manifest.tokenizer_sha256, found[0] / found[1])
    if manifest.num_samples("train") < c.global_batch_size:
        raise ConfigError(f"data.dir={c.data.dir} has {manifest.num_samples('train')} training samples, fewer than "
                          f"one global batch ({c.global_batch_size}); lower trainer.micro_batch_size or add data")


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
        train_loop_config={"config": c},
        scaling_config=cluster.scaling_config(cl),  # one worker per GPU, packed node by node
        run_config=RunConfig(name=c.run_name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cl.max_failures)),
    )
    start = time.perf_counter()
    with ProgressBar(run_dir, total_steps=c.trainer.stop_at_step or c.trainer.max_steps):
        trainer.fit()
    summary = summarize(run_dir)
    log.info("training finished in %.0fs: step %d, %s tokens seen, train loss %.4f, val loss %.4f; "
             "checkpoint %s; metrics %s", time.perf_counter() - start, summary["steps"],
             f"{summary['tokens_seen']:,}", summary["final_train_loss"], summary["final_val_loss"],
             summary["checkpoint"], summary["metrics"])
    return summary
