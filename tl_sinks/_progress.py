"""Progress bars: ``tqdm.auto`` (widget bars in Jupyter with ipywidgets, text bars elsewhere),
imported without its "IProgress not found" warning, which it raises at import in a notebook
kernel that lacks ipywidgets and then falls back to text bars anyway."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
