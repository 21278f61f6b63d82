"""Where the shipped default model lives (a leaf module: loading and the training script both read it)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"


def default_model_path() -> str:
    """Directory of the shipped default model (raises if the package data is missing)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the default model is missing from {DEFAULT_MODEL_DIR}; reinstall tl_sinks, or train it with "
            "`python -m tl_sinks.train.default_model train runs/default` and `install runs/default/model`"
        )
    return str(DEFAULT_MODEL_DIR)
