"""`distlm checkpoint info|reshape PATH`: look into a checkpoint, or make its layout-free (universal) form.

    distlm checkpoint info runs/demo/checkpoints            the latest complete checkpoint of a run
    distlm checkpoint info runs/demo/checkpoints/step00000200
    distlm checkpoint reshape runs/demo/checkpoints/step00000200

`info` validates the checkpoint (every file it lists is there with its size; every .pt file is whole) and
exits 1 if it does not. `reshape` writes `<tag>/universal/`, which a run at any other tp/pp/dp layout
resumes from, by the same path `distlm train` takes when the layout changed (Ray tasks, before any
training rank starts); doing it ahead saves that time on the cluster (or checks a conversion beforehand).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distlm.checkpoint import store, universal, weights
from distlm.config import CheckpointError

log = logging.getLogger(__name__)


def info(path: Path) -> str:
    """A readable description of the checkpoint at `path`; CheckpointError if it is not whole."""
    ckpt_dir, tag = store.resolve(path)
    tag_dir = ckpt_dir / tag
    state = store.verify(tag_dir)
    m = state.config["model"]
    files = [p for p in tag_dir.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if weights.is_weights_only(tag_dir):
        layout = "none (weights only, imported: resumes at any layout with a fresh optimizer)"
    else:
        layout = universal.describe(universal.layout_of(state.config))
        if universal.is_complete(tag_dir):
            layout += "; universal form present (resumes at any layout)"
    lines = [
        f"checkpoint  {tag_dir}",
        f"step        {state.step:,}",
        f"tokens      {state.tokens_seen:,} ({state.samples_seen:,} samples)",
        f"layout      {layout}",
        f"model       dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads / {m['n_kv_heads']} KV heads, "
        f"ffn {m['ffn_dim']}, vocab {m['vocab_size']}, tied embeddings {m['tie_embeddings']}",
        f"tokenizer   sha256 {state.tokenizer_sha256[:16]}",
        f"size        {size / 2**20:,.1f} MiB in {len(files)} files",
        "status      complete (all files present with their saved sizes)",
    ]
    if state.skipped_steps:
        lines.insert(3, f"skipped     {state.skipped_steps} steps (NaN/inf or spiking loss)")
    return "\n".join(lines)


def reshape(path: Path) -> Path:
    """The checkpoint's universal form, made as `distlm train` makes it: DeepSpeed's converter on Ray tasks
    (on the cluster of RAY_ADDRESS, or a local one)."""
    from distlm import cluster
    from distlm.config import compose_config

    ckpt_dir, tag = store.resolve(path)
    store.verify(ckpt_dir / tag)
    if weights.is_weights_only(ckpt_dir / tag):
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} holds imported weights only: it resumes at any layout "
                              f"as it is, and has no universal form")
    cluster.connect(compose_config().cluster)
    try:
        return universal.convert(ckpt_dir / tag, on_ray=True)
    except (ValueError, AssertionError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag}: cannot make its universal form: {e}") from e


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="distlm checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["info", "reshape"])
    parser.add_argument("path", type=Path, help="a checkpoints directory (its latest) or one tag directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.action == "info":
            print(info(args.path))
        else:
            out = reshape(args.path)
            print(f"universal checkpoint: {out}\nresume it at any layout with trainer.resume={out.parent}")
    except CheckpointError as e:
        log.error("%s", e)
        sys.exit(1)
