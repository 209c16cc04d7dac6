"""`distlm checkpoint info|reshape PATH`: look into a checkpoint, or make its layout-free (universal) form.

    distlm checkpoint info runs/demo/checkpoints            the latest complete checkpoint of a run
    distlm checkpoint info runs/demo/checkpoints/step00000200
    distlm checkpoint reshape runs/demo/checkpoints/step00000200

`info` validates the checkpoint (every file it lists is there with its size; every .pt file is whole) and
exits 1 if it does not. `reshape` writes `<tag>/universal/`, which a run at any other tp/pp/dp layout
resumes from; `distlm train` also does it by itself when the layout changed, so this only saves that
time on the cluster (or checks a conversion beforehand).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distlm.train import checkpoint, universal
from distlm.train.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def info(path: Path) -> str:
    """A readable description of the checkpoint at `path`; CheckpointError if it is not whole."""
    ckpt_dir, tag = checkpoint.resolve(path)
    tag_dir = ckpt_dir / tag
    state = checkpoint.verify(tag_dir)
    m = state.config["model"]
    files = [p for p in tag_dir.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if checkpoint.is_weights_only(tag_dir):
        layout = "none (weights only, imported: resumes at any layout with a fresh optimizer)"
    else:
        layout = universal.describe(universal.layout_of(state.config))
        if (tag_dir / universal.UNIVERSAL_DIR / "zero").is_dir():
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
    ckpt_dir, tag = checkpoint.resolve(path)
    checkpoint.verify(ckpt_dir / tag)
    try:
        return universal.convert(ckpt_dir / tag)
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
