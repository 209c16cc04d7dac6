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
trainer.max_steps=500`); `distlm COMMAND --cfg job` prints the composed config, `distlm COMMAND --help` lists
the groups. The others take plain arguments (`distlm COMMAND --help`).
"""

from __future__ import annotations

import importlib
import logging
import sys
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


def _run_with_hydra(command: str, args: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from distlm.config import CONF_DIR, CheckpointError, ConfigError, load_config

    def task(cfg: DictConfig) -> None:
        try:
            HYDRA_COMMANDS[command](load_config(cfg))
        except (ConfigError, CheckpointError) as e:
            log.error("%s", e)
            sys.exit(2)

    # Hydra reads sys.argv; the job name names the log file in the run dir (train.log, export.log, ...).
    sys.argv = [f"distlm {command}", *args, f"hydra.job.name={command}"]
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(task)()


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
