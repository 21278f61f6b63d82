"""circuitsvis views that render with no network.

circuitsvis' ``str(view)`` imports its JavaScript from a CDN (blank offline), and each view's
``local_src`` inlines the whole 1.3 MB bundle. :class:`OfflineView` always renders from the bundle
shipped in the circuitsvis wheel: ``local_src`` (self-contained, for Jupyter or a file) and
``fragment()`` (a small ``<div>`` + render call for pages that load :func:`circuitsvis_bundle`
once, as the HTML report does).

The ``show_*`` functions take tensors and token strings, not models (see :mod:`tl_sinks.report`
for the model-running side), select what to show *before* sending it to the browser (the payload
grows as heads x pos^2), and return an :class:`OfflineView`; they display nothing themselves.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from uuid import uuid4

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The circuitsvis JavaScript bundle (``dist/cdn/iife.js``) from the installed wheel."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():  # pragma: no cover - a broken circuitsvis install
        raise FileNotFoundError(f"circuitsvis bundle not found at {path}; reinstall circuitsvis")
    return path.read_text(encoding="utf-8").replace("</script>", "")


class OfflineView:
    """A circuitsvis element rendered from the local bundle.

    Attributes:
        element: The circuitsvis React element, e.g. ``"AttentionHeads"``.
        props: Its properties (JSON-serialisable).
    """

    def __init__(self, element: str, props: dict[str, Any]) -> None:
        from circuitsvis.utils.convert_props import convert_props

        self.element = element
        self.props = props
        self._props_js = convert_props(props)
        self.uid = "tl-sinks-cv-" + uuid4().hex[:12]

    def fragment(self) -> str:
        """``<div>`` + render call; needs :func:`circuitsvis_bundle` loaded earlier on the page."""
        return (
            f'<div id="{self.uid}" class="tl-sinks-view" data-element="{html.escape(self.element)}" style="margin: 12px 0;"></div>\n'
            f'<script>CircuitsVis.render("{self.uid}", CircuitsVis.{self.element}, {self._props_js});</script>'
        )

    @property
    def local_src(self) -> str:
        """Self-contained HTML: the bundle inlined, then the view."""
        return f"<script>{circuitsvis_bundle()}</script>\n{self.fragment()}"

    def _repr_html_(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page."""
        p = Path(path)
        p.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{self.local_src}</body></html>", encoding="utf-8")
        return p


def _label(tok: str) -> str:
    return tok.replace("\n", "\\n") if tok else tok


def show_attention(
    pattern: Tensor,
    str_tokens: Sequence[str],
    *,
    head_names: Sequence[str] | None = None,
    sink_positions: Sequence[int] = (0,),
    causal: bool = True,
    max_pos: int = 64,
) -> OfflineView:
    """Attention patterns of some heads, with the sink marked.

    Args:
        pattern: ``[head, query_pos, key_pos]`` (select heads first; e.g. the strongest sinks).
        str_tokens: Token strings of the prompt.
        head_names: One label per head (default ``H0, H1, ...``); the mean attention each head
            pays to the first sink position is appended, e.g. ``"L3H2 sink=0.91"``.
        sink_positions: Positions to mark as sinks in the token labels (``"⟦sink⟧ <s>"``).
        causal: Mask the upper triangle (False for encoders).
        max_pos: Show at most this many positions.

    Returns:
        :class:`OfflineView` of circuitsvis ``AttentionHeads``.
    """
    if pattern.ndim != 3:
        raise ValueError(f"pattern must be [head, query_pos, key_pos], got shape {tuple(pattern.shape)}")
    n = min(pattern.shape[-1], max_pos, len(str_tokens))
    p = pattern[:, :n, :n].detach().float().cpu()
    names = list(head_names) if head_names is not None else [f"H{i}" for i in range(p.shape[0])]
    if len(names) != p.shape[0]:
        raise ValueError(f"{len(names)} head names for {p.shape[0]} heads")
    s0 = sink_positions[0] if sink_positions else None
    if s0 is not None and s0 < n:
        q = p[:, s0:, s0] if causal else p[:, :, s0]
        names = [f"{name} sink={float(v):.2f}" for name, v in zip(names, q.mean(-1))]
    toks = [("⟦sink⟧ " if i in set(sink_positions) else "") + _label(t) for i, t in enumerate(str_tokens[:n])]
    return OfflineView("AttentionHeads", {"attention": p.tolist(), "tokens": toks, "attentionHeadNames": names, "maskUpperTri": causal})


def show_tokens(str_tokens: Sequence[str], values: Tensor | Sequence[float], *, labels: Sequence[str] | None = None) -> OfflineView:
    """Tokens coloured by one value each (``[pos]``) or several (``[pos, n]`` with ``labels``)."""
    v = torch.as_tensor(values).detach().float().cpu()
    toks = [_label(t) for t in str_tokens]
    if v.shape[0] != len(toks):
        raise ValueError(f"{v.shape[0]} values for {len(toks)} tokens")
    if v.ndim == 1:
        return OfflineView("ColoredTokens", {"tokens": toks, "values": v.tolist()})
    if labels is None or len(labels) != v.shape[1]:
        raise ValueError("pass one label per value column")
    return OfflineView("ColoredTokensMulti", {"tokens": toks, "values": v.tolist(), "labels": list(labels)})


def show_neuron_activations(str_tokens: Sequence[str], activations: Tensor, *, neuron_labels: Sequence[str]) -> OfflineView:
    """Chosen neurons' activations over a text: ``activations`` is ``[pos, n_neurons]``."""
    a = activations.detach().float().cpu()
    if a.ndim != 2 or a.shape[0] != len(str_tokens) or a.shape[1] != len(neuron_labels):
        raise ValueError(f"activations must be [pos={len(str_tokens)}, n_neurons={len(neuron_labels)}], got {tuple(a.shape)}")
    return OfflineView(
        "TextNeuronActivations",
        {"tokens": [_label(t) for t in str_tokens], "activations": a[:, None, :].tolist(),
         "firstDimensionName": "Group", "secondDimensionName": "Neuron",
         "firstDimensionLabels": ["super neurons"], "secondDimensionLabels": list(neuron_labels)},
    )


def props_json(view: OfflineView) -> str:
    """The view's properties as JSON (what the browser receives), for tests and debugging."""
    return json.dumps(view.props)
