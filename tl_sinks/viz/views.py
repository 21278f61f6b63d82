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
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any
from uuid import uuid4

import torch
from torch import Tensor

from tl_sinks._io import atomic_write_text

# Inside <script> the HTML parser ends the element at the first "</script" whatever the JS means,
# and "<!--" changes how it looks for that end; U+2028/U+2029 end a JS line in older engines.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")

# Props that circuitsvis puts into the page as markup (React's dangerouslySetInnerHTML in
# tokens/utils/Token.tsx and TokenCustomTooltip.tsx): a token such as "<img/src/onerror=...>"
# would run. The same strings are the hover tooltips' text ({token} in Token.tsx, the title in
# ColoredTokensMulti.tsx), so html-escaping them showed "&lt;s&gt;" there; see _markup_safe.
# AttentionHeads draws its tokens on a canvas (chart.js), as text: sent unchanged.
_HTML_PROPS: dict[str, tuple[str, ...]] = {
    "ColoredTokens": ("tokens",),
    "ColoredTokensMulti": ("tokens",),
    "TextNeuronActivations": ("tokens",),
}

# U+2060 WORD JOINER: invisible, zero width, no line break, and not whitespace to circuitsvis
# (its /\s/ -> &nbsp; replacement leaves it alone).
MARKUP_BREAK = "\u2060"
# In HTML text, "<" opens markup only before an ASCII letter, "/", "!" or "?", and "&" starts a
# character reference only before an ASCII letter, digit or "#" (WHATWG tokenizer, tag open and
# character reference states); anywhere else the parser keeps them as the characters themselves.
_OPENS_MARKUP_RE = re.compile(r"<(?=[A-Za-z/!?])|&(?=[A-Za-z0-9#])")


def script_json(obj: Any) -> str:
    """JSON that is safe to put inside an HTML ``<script>`` element.

    ``<``, ``>``, ``&``, U+2028 and U+2029 become ``\\u003c``, ``\\u003e``, ``\\u0026``,
    ``\\u2028`` and ``\\u2029``: the same value to a JSON or JavaScript parser, but no token
    string can close the element (``</script>``) or open a comment in it.

    Args:
        obj: A JSON-serialisable value (tensors and arrays must already be lists).

    Returns:
        The JSON text.
    """
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group()], json.dumps(obj))


def _markup_safe(x: Any) -> Any:
    """Strings that read the same as markup and as text: :data:`MARKUP_BREAK` after each
    ``<`` that would open a tag and each ``&`` that would start a character reference.

    circuitsvis sends one token string both to ``innerHTML`` (the token) and to a text node (its
    hover tooltip), so no escaping suits both: ``&lt;`` shows literally in the tooltip. With the
    joiner the HTML parser makes no element and decodes no reference, so both show the original
    characters (``<s>``, ``<img src=x onerror=...>``) and nothing can run. Strings are changed
    only where needed (``"a & b"``, ``"< 3"`` stay as they are). Applies to ``x`` a string or
    nested lists of them.
    """
    if isinstance(x, str):
        return _OPENS_MARKUP_RE.sub(lambda m: m.group() + MARKUP_BREAK, x)
    if isinstance(x, (list, tuple)):
        return [_markup_safe(v) for v in x]
    return x


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The circuitsvis JavaScript bundle (``dist/cdn/iife.js``) from the installed wheel."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():  # pragma: no cover - a broken circuitsvis install
        raise FileNotFoundError(f"circuitsvis bundle not found at {path}; reinstall circuitsvis")
    # "</script" would end the inline <script>; "<\/script" means the same inside JS strings.
    return re.sub(r"</(script)", r"<\\/\1", path.read_text(encoding="utf-8"), flags=re.IGNORECASE)


class OfflineView:
    """A circuitsvis element rendered from the local bundle.

    Any strings are safe in ``props``: the page receives them as :func:`script_json`, and those
    that circuitsvis renders as markup (the token strings of ``ColoredTokens``,
    ``ColoredTokensMulti`` and ``TextNeuronActivations``, which are also their hover text) with an
    invisible :data:`MARKUP_BREAK` after any ``<`` or ``&`` that would start markup, so that the
    tokens and their tooltips both read ``<s>`` (see :func:`_markup_safe`). The page's DOM text
    holds that joiner (as does a copy of it); ``text.replace(MARKUP_BREAK, "")`` removes it.

    ``repr(view)`` and ``print(view)`` give one line (the element, what it shows, the colour
    scale); the page itself is ``_repr_html_`` (Jupyter), ``local_src`` or :meth:`save`.

    Attributes:
        element: The circuitsvis React element, e.g. ``"AttentionHeads"``.
        props: Its properties (JSON-serialisable), as given.
    """

    def __init__(self, element: str, props: dict[str, Any]) -> None:
        from circuitsvis.utils.convert_props import convert_prop_type

        if not element.isidentifier():  # it is written into the page's JavaScript as a name
            raise ValueError(f"element must be a circuitsvis component name, got {element!r}")
        self.element = element
        self.props = props
        # circuitsvis' convert_props, made safe inside <script> and, for props circuitsvis
        # renders as markup, as HTML: token strings come from the tokenizer, i.e. from the model's files.
        # Not html-escaped: the same strings are the tooltips' text, where "&lt;" would show.
        sent = {k: convert_prop_type(v) for k, v in props.items() if v is not None}
        for k in _HTML_PROPS.get(element, ()):
            if k in sent:
                sent[k] = _markup_safe(sent[k])
        self._props_js = script_json(sent)
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

    def __repr__(self) -> str:
        return f"<OfflineView {self.element}: {self._summary()}; display in Jupyter or .save(path)>"

    def __str__(self) -> str:
        return repr(self)

    def _summary(self) -> str:
        """What the view shows, in a few words (for ``repr``)."""
        toks = self.props.get("tokens")
        parts = [f"{len(toks)} tokens"] if isinstance(toks, (list, tuple)) else []
        if self.element == "AttentionHeads" and "attention" in self.props:
            parts.append(f"{len(self.props['attention'])} heads")
        if self.props.get("labels") is not None:
            parts.append(f"{len(self.props['labels'])} value columns")
        if "maxValue" in self.props or "positiveBounds" in self.props:
            top = self.props.get("maxValue", (self.props.get("positiveBounds") or [None])[0])
            parts.append(f"colour scale +-{top:.3g}")
        return ", ".join(parts) or "no tokens"

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page."""
        page = f"<!doctype html><html><head><meta charset='utf-8'></head><body>{self.local_src}</body></html>"
        return atomic_write_text(Path(path), page)


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


def symmetric_bound(values: Tensor) -> float:
    """``max |value|`` over the finite entries, to 6 significant digits (1.0 if there are none or
    all are 0).

    The colour scale of a token view runs from ``-bound`` (red) through 0 (white) to ``+bound``
    (blue), one scale for the whole view, so the largest value is the most saturated token and
    values near 0 are near white whatever neuron or column they belong to.
    """
    v = values.detach().float()
    v = v[torch.isfinite(v)].abs()
    top = float(f"{float(v.max()):.6g}") if v.numel() else 0.0  # float32 24.2 shows as 24.200001
    return top if top > 0 else 1.0


def _bound(values: Tensor, max_abs: float | None) -> float:
    if max_abs is None:
        return symmetric_bound(values)
    if not (max_abs > 0 and max_abs < float("inf")):
        raise ValueError(f"max_abs must be a positive finite number, got {max_abs!r}")
    return float(max_abs)


def show_tokens(
    str_tokens: Sequence[str],
    values: Tensor | Sequence[float],
    *,
    labels: Sequence[str] | None = None,
    max_abs: float | None = None,
) -> OfflineView:
    """Tokens coloured by one value each (``[pos]``) or several (``[pos, n]`` with ``labels``).

    One colour scale for the whole view, centred at zero: ``-max_abs`` is full red, 0 white,
    ``+max_abs`` full blue (circuitsvis' own default scales each column to its min and max, which
    paints the smallest value of a column full red even when it is ~0). ``max_abs`` defaults to
    :func:`symmetric_bound` of all the values; with several columns the same bound is used for
    each (circuitsvis keeps the first column's bounds when another is selected).

    Returns:
        :class:`OfflineView` of circuitsvis ``ColoredTokens`` (one value per token: props
        ``minValue = -max_abs``, ``maxValue = max_abs``) or ``ColoredTokensMulti``
        (``negativeBounds`` / ``positiveBounds``, one entry per column).
    """
    v = torch.as_tensor(values).detach().float().cpu()
    toks = [_label(t) for t in str_tokens]
    if v.shape[0] != len(toks):
        raise ValueError(f"{v.shape[0]} values for {len(toks)} tokens")
    m = _bound(v, max_abs)
    if v.ndim == 1:
        return OfflineView("ColoredTokens", {"tokens": toks, "values": v.tolist(), "minValue": -m, "maxValue": m})
    if labels is None or len(labels) != v.shape[1]:
        raise ValueError("pass one label per value column")
    return OfflineView("ColoredTokensMulti", {
        "tokens": toks, "values": v.tolist(), "labels": list(labels),
        "negativeBounds": [-m] * v.shape[1], "positiveBounds": [m] * v.shape[1],
    })


def show_neuron_activations(
    str_tokens: Sequence[str],
    activations: Tensor,
    *,
    neuron_labels: Sequence[str],
    max_abs: float | None = None,
) -> OfflineView:
    """Chosen neurons' activations over a text: ``activations`` is ``[pos, n_neurons]``.

    A ``ColoredTokensMulti`` view, one column per neuron (click a label to switch; hover a token
    for every neuron's value), with one colour scale for all neurons, centred at zero
    (see :func:`show_tokens`): the neuron and token with the largest ``|activation|`` are the most
    saturated, near-zero activations near white. (circuitsvis' ``TextNeuronActivations`` scales
    each neuron to its own min and max for a single text and takes no bounds.)
    """
    a = activations.detach().float().cpu()
    if a.ndim != 2 or a.shape[0] != len(str_tokens) or a.shape[1] != len(neuron_labels):
        raise ValueError(f"activations must be [pos={len(str_tokens)}, n_neurons={len(neuron_labels)}], got {tuple(a.shape)}")
    return show_tokens(str_tokens, a, labels=list(neuron_labels), max_abs=max_abs)


def props_json(view: OfflineView) -> str:
    """The view's properties as the JSON embedded in the page, for tests and debugging.

    ``json.loads`` gives back ``view.props``, except that the props circuitsvis renders as markup
    hold :data:`MARKUP_BREAK` after a ``<`` or ``&`` that would start markup (removing it gives
    back the originals).
    """
    return view._props_js
