"""Convert a distlm checkpoint to a Hugging Face Llama directory.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [hydra overrides...]

CHECKPOINT is a run's checkpoints directory (its latest complete tag is used) or one tag directory.
Overrides apply to the composed config, e.g. `export.dtype=bf16 export.verify=false`.
"""

import logging
import sys
from pathlib import Path

from distlm.config import CheckpointError, ConfigError, compose_config
from distlm.hf.export import export


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    checkpoint, out_dir, *overrides = argv
    # Quoted, so paths with characters Hydra's override grammar treats specially still pass through.
    paths = [f"export.checkpoint_dir='{Path(checkpoint).resolve()}'", f"export.out_dir='{Path(out_dir).resolve()}'"]
    try:
        export(compose_config(*paths, *overrides))
    except (CheckpointError, ConfigError, FileExistsError) as e:  # the message says what to fix
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
