"""Checkpoints that outlive their layout: DeepSpeed universal checkpoints under one-process names.

A checkpoint holds one file per rank of the layout that wrote it (tp x pp x dp). To resume it at another
layout, or to export it, DeepSpeed's `ds_to_universal` merges those shards into one folder per parameter,
`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`: TP slices concatenated, ZeRO partitions joined, vocabulary
padding dropped, by the rules the model declares (`parallelize.universal_checkpoint_info`). distlm keeps
that folder in the checkpoint, `<tag>/universal/`, with each parameter under its one-process Llama name;
a layout about to load it links its own names (`3.layers.2.mlp.up_proj.weight`) to those.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable


log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"


def layout_of(config: dict[str, Any]) -> dict[str, int]:
    """tp, pp, dp and ZeRO stage of a composed config (as saved in a checkpoint's run state)."""
    par, workers = config["parallel"], config["cluster"]["num_workers"]
    return {"tp": par["tp"], "pp": par["pp"], "dp": workers // (par["tp"] * par["pp"]),
            "zero_stage": par["zero_stage"]}


def describe(layout: dict[str, int]) -> str:
    return f"tp {layout['tp']} x pp {layout['pp']} x dp {layout['dp']}, ZeRO-{layout['zero_stage']}"


def needs_universal(saved_config: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether a checkpoint written under `saved_config` must go through its universal form to be loaded
    under `config`: DeepSpeed's own loading needs the same TP, PP and ZeRO stage, and with ZeRO >= 1
    (optimizer states partitioned over data-parallel ranks) the same DP size."""
    was, now = layout_of(saved_config), layout_of(config)
    if was == now:
        return False
    return was["zero_stage"] > 0 or (was["tp"], was["pp"], was["zero_stage"]) != (now["tp"], now["pp"], now["zero_stage"])


def convert(tag_dir: Path) -> Path:
    """`tag_dir/universal`, made once with ds_to_universal (written under a temporary name, renamed into
    place when complete); returns it."""
    from deepspeed.checkpoint import ds_to_universal

    from distlm.model.parallelize import canonical_name

    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL_DIR
    if (out / "zero").is_dir():
        return out
    if not any(tag_dir.glob("*optim_states.pt")):
        raise ValueError(f"checkpoint {tag_dir} has no ZeRO optimizer shards (written with ZeRO-0): it can only be "
                         f"loaded with the tensor/pipeline layout and ZeRO stage that wrote it")
    tmp = tag_dir / f".{UNIVERSAL_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a universal checkpoint", tag_dir)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    try:
        ds_to_universal.main(args)
        for param_dir in (tmp / "zero").iterdir():
            name = canonical_name(param_dir.name)
            if param_dir.is_dir() and name != param_dir.name:
                param_dir.rename(param_dir.with_name(name))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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

