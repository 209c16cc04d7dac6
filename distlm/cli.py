"""The `distlm` command: each subcommand calls one stage's function.

    distlm preprocess [overrides]   raw JSONL/text/parquet -> cleaned, deduplicated, tokenized, packed shards (Ray)
    distlm train      [overrides]   Ray Train workers running DeepSpeed; resumes from the latest checkpoint
    distlm export     [overrides]   a checkpoint -> a Hugging Face LlamaForCausalLM directory
    distlm generate   [overrides]   continue a prompt with an exported (or any local HF Llama) model
    distlm eval       [overrides]   validation perplexity of a checkpoint or a HF directory on the shards
    distlm plan       [overrides]   per-rank and per-node memory of a model and layout, at start-up and in a training
                                    step: does it fit, what would? (exit status 1 when it does not fit)
    distlm report     RUN_DIR       summary of a run and a PNG plot of its loss curve
    distlm checkpoint info|reshape PATH
                                    validate and describe a checkpoint | make its any-layout (universal) form
    distlm import-hf  HF_DIR OUT_DIR
                                    a local HF Llama directory -> a distlm checkpoint to train from (any layout)
    distlm submit     [--address URL] [--wait] COMMAND [overrides]
                                    run preprocess/train/export/generate/eval as a job on a running Ray cluster

The commands with [overrides] compose conf/ with Hydra: `key=value` or `group=option` (e.g. `model=tiny
trainer.max_steps=500`); `distlm COMMAND --help` says what it does, the keys that matter and two examples,
`distlm COMMAND --cfg job` prints the whole composed config. The others take plain arguments (`--help`).
"""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("distlm")


def _preprocess(c) -> None:
    from distlm.data.preprocess.pipeline import preprocess

    preprocess(c)


def _train(c) -> None:
    from distlm.train.driver.launch import train

    train(c)


def _export(c) -> None:
    from distlm.hf.export import export

    export(c)


def _generate(c) -> None:
    from distlm.hf.generate import generate

    generate(c)


def _eval(c) -> None:
    from distlm.eval import evaluate

    evaluate(c)


def _plan(c) -> None:
    from distlm.plan import print_plan

    if not print_plan(c).fits:
        sys.exit(1)  # `distlm train` refuses the same config before any worker starts


HYDRA_COMMANDS: dict[str, Callable] = {
    "preprocess": _preprocess,
    "train": _train,
    "export": _export,
    "generate": _generate,
    "eval": _eval,
    "plan": _plan,
}

# Commands on paths rather than on the composed config: plain arguments, each module's `main(args)`.
ARGPARSE_COMMANDS = {
    "report": "distlm.run_report",
    "submit": "distlm.submit",
    "checkpoint": "distlm.checkpoint.cli",
    "import-hf": "distlm.hf.importer",
}


# Per-command help: what it does, the keys that matter (their defaults are read from conf/), two examples.
HELP: dict[str, tuple[str, list[str], list[str]]] = {
    "preprocess": ("Clean, filter, deduplicate, tokenize and pack raw text into WebDataset shards (Ray tasks), "
                   "resumably:\ndata.inputs -> data.dir (shards, tokenizer.json, manifest.json).",
                   ["data.inputs", "data.dir", "data.seq_len", "data.tokenizer.vocab_size", "data.tokenizer.path",
                    "data.val_fraction", "data.near_dup_threshold", "data.keep_doc_boundaries", "data.shard_mb"],
                   ["distlm preprocess data.inputs=[corpus/*.jsonl.gz] data.dir=data/mine data.seq_len=2048",
                    "distlm preprocess data.tokenizer.path=tokenizer.json data.pii.enabled=false"]),
    "train": ("Train the model on data.dir's shards with Ray Train workers running DeepSpeed; resumes from the "
              "latest\ncheckpoint in run_dir (at any layout) and logs to run_dir/metrics.jsonl and W&B.",
              ["model", "data.dir", "run_dir", "cluster.num_workers", "parallel.zero_stage", "trainer.max_steps",
               "trainer.micro_batch_size", "trainer.grad_accum", "trainer.precision", "optimizer.lr",
               "trainer.checkpoint_every"],
              ["distlm train model=tiny trainer.max_steps=500",
               "distlm train model=1.3b cluster=gpu cluster.num_workers=8 parallel.zero_stage=2 run_name=big"]),
    "export": ("Write a checkpoint as a Hugging Face LlamaForCausalLM directory (safetensors, tokenizer, "
               "config), checked\nagainst distlm's model by comparing logits.",
               ["export.checkpoint_dir", "export.tag", "export.out_dir", "export.dtype", "export.max_shard_mb",
                "export.verify"],
               ["distlm export run_name=demo", "distlm export export.checkpoint_dir=runs/big/checkpoints "
                "export.dtype=bf16 export.out_dir=out/hf"]),
    "generate": ("Continue a prompt with an exported (or any local Hugging Face Llama) model, or a checkpoint.",
                 ["generate.model_dir", "generate.prompt", "generate.max_new_tokens", "generate.temperature",
                  "generate.top_k", "generate.top_p", "generate.seed"],
                 ['distlm generate generate.prompt="And God said"',
                  "distlm generate generate.model_dir=runs/big/hf generate.temperature=0"]),
    "eval": ("Validation perplexity of a checkpoint or a Hugging Face directory on data.dir's shards.",
             ["eval.checkpoint", "eval.model_dir", "data.dir", "eval.split", "eval.batch_size", "eval.batches",
              "eval.out"],
             ["distlm eval run_name=demo", "distlm eval eval.model_dir=runs/demo/hf eval.batches=8"]),
    "plan": ("Per-GPU and per-node memory of a model under a layout, before renting the cluster: does it fit, "
             "and what\nwould?",
             ["model", "cluster", "cluster.num_workers", "parallel.tp", "parallel.pp", "parallel.zero_stage",
              "data.seq_len", "trainer.micro_batch_size", "trainer.precision"],
             ["distlm plan model=7b cluster=gpu cluster.num_workers=8",
              "distlm plan model=70b cluster=gpu cluster.num_workers=64 parallel=3d"]),
}


def _help(command: str) -> str:
    from omegaconf import OmegaConf

    from distlm.config import CONF_DIR

    what, keys, examples = HELP[command]
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    groups = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}
    cfg = _compose([])
    lines = [f"distlm {command}: {what}", "", "Keys that matter (default):"]
    for key in keys:
        if key in groups:
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            value = f"{groups[key]}   (a group: {', '.join(options)})"
        else:
            node = OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
            value = "???" if node is None and OmegaConf.is_missing(cfg, key) else node
        lines.append(f"  {key:<28} {value}")
    lines += ["", "Examples:", *(f"  {e}" for e in examples), "",
              f"Any key is set as key=value, a group as group=option. The whole config: distlm {command} --cfg job",
              f"(resolved: add --resolve); Hydra's own options: distlm {command} --hydra-help."]
    return "\n".join(lines)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from distlm.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        child = cfg._get_node(k)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys += _leaf_keys(child, full + ".")
    return keys


def check_overrides(command: str, args: list[str]) -> None:
    """Compose the overrides as Hydra will, before Hydra runs: an unknown key gets "did you mean" (Hydra would
    advise appending it with `+`, which only moves the error), any composition error a one-line message.
    Raises ConfigError (the command exits 2, as for every usage error)."""
    import difflib

    from omegaconf import OmegaConf

    from distlm.config import CONF_DIR, ConfigError

    overrides = [a for a in args if "=" in a and not a.startswith(("+", "~", "hydra.", "-"))]
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    chosen = [a for a in overrides if a.split("=", 1)[0] in groups]
    for group, option in (a.split("=", 1) for a in chosen):
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        if option not in options:
            close = difflib.get_close_matches(option, options, n=1)
            raise ConfigError(f"no {group} '{option}'" + (f": did you mean {group}={close[0]}?" if close else "")
                              + f" ({group} is one of: {', '.join(options)})")
    try:
        cfg = _compose(chosen)
    except Exception as e:  # noqa: BLE001 - Hydra raises its own kinds for a missing option
        raise ConfigError(f"{e}".splitlines()[0]) from None
    known = _leaf_keys(cfg)
    for override in overrides:
        key = override.split("=", 1)[0]
        if key in groups or key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else \
            f"`distlm {command} --help` lists the main keys, `distlm {command} --cfg job` all of them"
        raise ConfigError(f"unknown config key '{key}': {hint}")
    try:
        OmegaConf.to_container(_compose([a for a in args if "=" in a and not a.startswith(("-", "hydra."))]),
                               resolve=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{e}".splitlines()[0]) from None


def _run_with_hydra(command: str, args: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from distlm.config import CONF_DIR, CheckpointError, ConfigError, load_config

    if any(a in ("-h", "--help") for a in args):
        print(_help(command))
        return
    args = ["--help" if a == "--hydra-help" else a for a in args]   # flags (--cfg job, ...) are Hydra's own
    try:
        check_overrides(command, args)
    except ConfigError as e:
        print(f"distlm {command}: {e}", file=sys.stderr)
        sys.exit(2)

    def task(cfg: DictConfig) -> None:
        before = _run_dir_state(command)
        try:
            HYDRA_COMMANDS[command](load_config(cfg))
        except (ConfigError, CheckpointError) as e:
            log.error("%s", e)
            _restore_run_dir(before)   # a run refused before it started leaves run_dir as it was
            sys.exit(2)

    # Hydra reads sys.argv; the job name names the log file in the run dir (train.log, export.log, ...).
    sys.argv = [f"distlm {command}", *args, f"hydra.job.name={command}"]
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(task)()


def _run_dir_state(command: str) -> tuple[Path, Path, int, bool]:
    """As the task starts (Hydra has made run_dir and opened the command's log, writing nothing yet): run_dir,
    the log, the log's size, and whether run_dir holds anything else (then it existed before)."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    log_file = out / f"{command}.log"
    size = log_file.stat().st_size if log_file.is_file() else 0
    return out, log_file, size, any(p != log_file for p in out.iterdir())


def _restore_run_dir(state: tuple[Path, Path, int, bool]) -> None:
    out, log_file, size, others = state
    logging.shutdown()   # flush and close the log file first
    if size == 0 and not others:
        shutil.rmtree(out, ignore_errors=True)
    elif size == 0:
        log_file.unlink(missing_ok=True)
    else:
        with open(log_file, "r+b") as f:
            f.truncate(size)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, args = argv[0], argv[1:]
    if command in ARGPARSE_COMMANDS:
        module = importlib.import_module(ARGPARSE_COMMANDS[command])
        module.main(args)
    elif command in HYDRA_COMMANDS:
        _run_with_hydra(command, args)
    else:
        print(f"distlm: unknown command '{command}'; choose from: {', '.join([*HYDRA_COMMANDS, *ARGPARSE_COMMANDS])}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
