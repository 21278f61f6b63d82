"""Result objects shared by every stage.

Every stage returns a :class:`SinkResult`: a tensor with named dims (the same axis words as the
jaxtyping annotations, e.g. ``layer head_index key_pos``), optional tick labels per dim, and
provenance in ``meta`` (model name, TransformerLens version, weight processing, ``prepend_bos``,
whether attention is causal). Results turn into tidy pandas DataFrames with :meth:`to_frame`
and show as a short table in Jupyter (``_repr_html_``, no JavaScript, no network).

Stage results subclass it and add the extra tensors they need (counts, baselines, per-finding
tables) plus methods that derive the headline numbers (``sink_rate``, ``first_rest_ratio``, ...).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd
import torch
from torch import Tensor

R = TypeVar("R", bound="SinkResult")


@dataclass(frozen=True, kw_only=True)
class SinkResult:
    """A tensor with named dims, optional tick labels, and provenance.

    Attributes:
        values: The main tensor of the result.
        dims: One name per axis of ``values`` (``layer``, ``head_index``, ``pos``, ...).
        value_name: Column name of ``values`` in :meth:`to_frame`.
        coords: Optional tick labels per dim, e.g. ``{"key_pos": str_tokens}``.
        meta: Provenance: model, TransformerLens version, weight processing, settings.
    """

    values: Tensor
    dims: tuple[str, ...]
    value_name: str
    coords: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.dims) != self.values.ndim:
            raise ValueError(f"dims={self.dims} but values.ndim={self.values.ndim}")
        for d, ticks in self.coords.items():
            if d not in self.dims:
                raise ValueError(f"coords given for unknown dim {d!r}; dims are {self.dims}")
            n = self.values.shape[self.dims.index(d)]
            if len(ticks) != n:
                raise ValueError(f"coords[{d!r}] has {len(ticks)} labels, axis has {n}")

    # ------------------------------------------------------------------ pandas
    def to_frame(self) -> pd.DataFrame:
        """Tidy DataFrame: one row per element of ``values``.

        Columns are the dims (integer indices), ``<dim>_label`` for dims with coords, and
        ``value_name``.
        """
        return _tensor_to_frame(self.values, self.dims, self.value_name, self.coords)

    def top(self, k: int = 10, *, by_abs: bool = False) -> pd.DataFrame:
        """The ``k`` largest elements as rows of :meth:`to_frame` (NaNs last)."""
        df = self.to_frame()
        key = df[self.value_name].abs() if by_abs else df[self.value_name]
        order = key.sort_values(ascending=False, na_position="last").index
        return df.loc[order[:k]].reset_index(drop=True)

    # ------------------------------------------------------------------ tensors
    def to(self: R, device: str | torch.device) -> R:
        """Copy with every tensor field moved to ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ display
    def _dims_str(self) -> str:
        return "[" + ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape)) + "]"

    def _range_str(self) -> str:
        v = self.values.detach().float()
        finite = v[torch.isfinite(v)]
        if finite.numel() == 0:
            return "no finite values"
        return f"{self.value_name} in [{finite.min().item():.4g}, {finite.max().item():.4g}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._dims_str()} {self._range_str()}"

    def _summary_lines(self) -> list[str]:
        """Headline lines shown above the table; stages override."""
        return []

    def _repr_html_(self) -> str:
        lines = "".join(f"<li>{html.escape(s)}</li>" for s in self._summary_lines())
        head = f"<b>{html.escape(type(self).__name__)}</b> {html.escape(self._dims_str())}"
        body = f"<ul>{lines}</ul>" if lines else "<br>"
        return head + body + self.top(10).to_html(index=False)


def _tensor_to_frame(
    values: Tensor,
    dims: Sequence[str],
    value_name: str,
    coords: Mapping[str, Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """Long-form DataFrame of a tensor with named dims."""
    idx = pd.MultiIndex.from_product([range(n) for n in values.shape], names=list(dims))
    flat = values.detach().float().cpu().reshape(-1).numpy()
    df = pd.DataFrame({value_name: flat}, index=idx).reset_index()
    for d, ticks in (coords or {}).items():
        df[f"{d}_label"] = df[d].map(dict(enumerate(ticks)))
    return df


def meta_html(meta: Mapping[str, Any]) -> str:
    """A small two-column HTML table of provenance entries."""
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in meta.items()
    )
    return f"<table>{rows}</table>"
