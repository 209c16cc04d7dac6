"""Convert a local Hugging Face Llama directory to a distlm checkpoint that any layout trains from.

    python tools/convert_from_hf.py HF_DIR OUT_DIR

The same as `distlm import-hf HF_DIR OUT_DIR`; see distlm/hf/importer.py.
"""

import sys

from distlm.hf.importer import main

if __name__ == "__main__":
    main(sys.argv[1:])
