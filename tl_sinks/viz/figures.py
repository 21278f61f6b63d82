"""Static matplotlib figures built from result objects (``plot_*`` return a Figure, never show it).

Each figure is drawn from a result's tensors, so it is reproducible from the saved numbers and
works offline; :func:`figure_to_html` embeds one in a page as a base64 PNG.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure`` drawn by
the Agg canvas) and never touch ``pyplot``: importing this module does not select or change the
backend, and the figures do not join the user's pyplot figures (``plt.show()`` does not show
them). In Jupyter a returned figure displays itself as a PNG.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


class SinkFigure(Figure):
    """A matplotlib ``Figure`` on its own Agg canvas, outside pyplot; shows itself in Jupyter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        FigureCanvasAgg(self)

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def _subplots(ncols: int = 1, *, figsize: tuple[float | int, float | int]) -> tuple[SinkFigure, Any]:
    fig = SinkFigure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    return fig, axes


# Cells above eps get a thick edge in a colour that stands out on every viridis shade, drawn
# inside the cell so that neighbouring outlined cells stay separate squares, not a grid.
_OUTLINE = dict(fill=False, ec="#ff1f5b", lw=2.5)
_OUTLINE_INSET = 0.12


def plot_sink_heatmap(sinks: Any, pos: int = 0, *, annotate: bool | None = None) -> Figure:
    """Layer x head heatmap of the mean attention received by ``pos``.

    Heads whose mean attention to ``pos`` exceeds eps get a thick edge (inset, one per head; the
    patches carry ``gid="above_eps"``); no other cell has an edge. Each cell shows its value when
    the grid is small enough to read (``annotate``; default: at most 400 cells).
    """
    v = sinks.values[:, :, pos].numpy()
    n_layers, n_heads = v.shape
    above = v > sinks.eps
    # Wide enough for the title even with few heads.
    fig, ax = _subplots(figsize=(max(5.5, 1.6 + 0.55 * n_heads), 1.6 + 0.45 * n_layers))
    im = ax.imshow(v, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    d = _OUTLINE_INSET
    for layer, head in zip(*np.nonzero(above)):
        ax.add_patch(Rectangle((head - 0.5 + d, layer - 0.5 + d), 1 - 2 * d, 1 - 2 * d, gid="above_eps", **_OUTLINE))
    if annotate if annotate is not None else v.size <= 400:
        for (layer, head), x in np.ndenumerate(v):
            ax.text(head, layer, f"{x:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if x > 0.55 else "white", fontweight="bold" if above[layer, head] else "normal")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head_index")
    ax.set_ylabel("layer")
    ax.set_title(
        f"mean attention received by position {pos}, per head\n"
        f"outlined: mean > eps={sinks.eps} ({int(above.sum())} of {v.size} heads); "
        f"sink rate (per prompt) {sinks.sink_rate(pos):.2f}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def plot_value_aggregation(agg: Any, max_pos: int = 64) -> Figure:
    """Variance of the concatenated head outputs by position, per layer, with the ``1/(t+1)``
    expectation of uniform averaging (dashed)."""
    var = agg.var_all_heads[:, :max_pos].numpy()
    exp = agg.uniform_expectation().values[:, :max_pos].numpy()
    n = agg.n_prompts[:max_pos].numpy() > 0
    pos = np.arange(var.shape[1])[n]
    fig, ax = _subplots(figsize=(7, 4))
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, var.shape[0]))
    for layer, c in enumerate(colors):
        ax.plot(pos, var[layer][n], color=c, marker="o", ms=3, label=f"layer {layer}")
        ax.plot(pos, exp[layer][n], color=c, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("variance of hook_z over heads x d_head")
    ax.set_title(f"value aggregation ({agg.meta.get('attention', '?')}): variance of the attention output by position\n"
                 "dashed: var(first) / (t+1), what averaging t+1 independent values like the first would give", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_massive_activations(disp: Any, layer: int | None = None, top: int = 16) -> Figure:
    """Bars of the largest first-token residual dims at ``layer`` (default: where the largest is),
    against each dim's largest value at other positions, with the Sun et al. threshold at
    position 0 (dashed) and, in the subtitle, which dims met it (or that none did)."""
    fm = disp.first_mean_abs
    layer = int(fm.max(1).values.argmax()) if layer is None else layer
    order = fm[layer].argsort(descending=True)[:top].numpy()
    x = np.arange(len(order))
    fig, ax = _subplots(figsize=(7.5, 4))
    ax.bar(x - 0.2, fm[layer][order].numpy(), width=0.4, label="mean |x| at position 0")
    ax.bar(x + 0.2, disp.rest_max_abs[layer][order].numpy(), width=0.4, label="max |x| at positions >= 1")
    median = float(disp.median[layer, 0])
    abs_t = float(disp.meta.get("abs_threshold", 100.0))
    rel_t = float(disp.meta.get("rel_threshold", 1000.0))
    thr = max(abs_t, rel_t * median)
    ax.axhline(thr, ls="--", color="k", lw=1, gid="sun_threshold",
               label=f"Sun et al. threshold at position 0: |x| > {thr:.3g}")
    ax.set_xticks(x, [str(d) for d in order], rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(top=max(ax.get_ylim()[1], thr * 2))  # the threshold inside the frame, not on its edge
    ax.set_xlabel("residual dim")
    ax.set_ylabel("|x| after the block")
    md = disp.massive_dims()
    first = md[md["pos_class"] == "first"] if len(md) else md
    if len(first):
        sun = "Sun-massive dims at position 0: " + ", ".join(
            f"{int(r.dim)} (layers {int(r.first_layer)}-{int(r.last_layer)})" for r in first.head(4).itertuples())
    else:
        sun = (f"no Sun-massive dim at position 0 (|x| > {abs_t:g} and > {rel_t:g}x the token's median, "
               f"here {median:.3g})")
    ax.set_title(f"largest first-token residual dims (|x| at position 0) vs the rest, after block {layer}\n{sun}",
                 fontsize=8.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_intervention_sweep(trace: Any, *, uniform: float | None = None) -> Figure:
    """Attention received by the intervened position vs lambda (peak over layers), and per layer.

    Both panels draw the sink threshold eps (dashed, ``gid="eps"``) and, when ``uniform`` is
    given, the attention that uniform attention would give the position (dash-dot,
    ``gid="uniform"``), and their y-axes run from 0 to 1.1 x max(eps, data), so a change far below
    the threshold looks as small as it is.

    Args:
        trace: A :class:`~tl_sinks.trace.ChainTrace`.
        uniform: Mean attention the position would receive from the later queries under uniform
            attention (e.g. from :func:`tl_sinks.sinks.uniform_received` with ``exclude_self=True``).
    """
    sw = trace.sweep
    peak = trace.peak_received()
    eps = float(trace.meta.get("eps", 0.3))
    fig, (a, b) = _subplots(2, figsize=(10, 4.2))
    # One colour per condition in both panels; red is kept for the threshold.
    color = {"none": "k", "self_only_mask": "C2", "amplify_deviation": "C0", "scale_output": "C1"}
    for name, marker in (("amplify_deviation", "o"), ("scale_output", "s")):
        d = peak[peak["intervention"] == name]
        a.plot(d["lam"], d["peak_received"], marker=marker, color=color[name], label=name)
    for name, ls in (("self_only_mask", "-"), ("none", ":")):
        d = peak[peak["intervention"] == name]
        if len(d):
            a.axhline(float(d["peak_received"].iloc[0]), ls=ls, color=color[name], label=name)
    a.set_xlabel("lambda")
    a.set_ylabel(f"attention to position {trace.pos} (peak over layers)")
    for name, ls in (("none", ":"), ("self_only_mask", "-")):
        d = sw[sw["intervention"] == name]
        b.plot(d["layer"], d["received"], marker="o", ls=ls, color=color[name], label=name)
    lam_max = sw["lam"].max()
    for name in ("amplify_deviation", "scale_output"):
        d = sw[(sw["intervention"] == name) & (sw["lam"] == lam_max)]
        b.plot(d["layer"], d["received"], marker=".", color=color[name], label=f"{name} lambda={lam_max:g}")
    b.set_xlabel("layer")
    b.set_ylabel(f"attention to position {trace.pos}")
    top = max(eps, float(sw["received"].max()) if len(sw) else 0.0, uniform or 0.0) * 1.1
    for ax in (a, b):
        ax.axhline(eps, ls="--", color="C3", lw=1.2, gid="eps", label=f"sink threshold eps={eps:g}")
        if uniform is not None:
            ax.axhline(uniform, ls="-.", color="0.5", lw=1, gid="uniform", label=f"uniform attention ({uniform:.3f})")
        ax.set_ylim(0, top)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(_sweep_verdict(peak, trace.pos, eps), fontsize=10)
    fig.tight_layout()
    return fig


def _sweep_verdict(peak: Any, pos: int, eps: float) -> str:
    """One line: did any intervention make ``pos`` a sink (peak attention over layers > eps)?"""
    base = peak.loc[peak["intervention"] == "none", "peak_received"]
    tried = peak[peak["intervention"] != "none"]
    if len(base) and float(base.iloc[0]) > eps:
        return f"position {pos} is a sink without intervention (peak attention {float(base.iloc[0]):.3f} > eps={eps:g})"
    if not len(tried):
        return f"no intervention at position {pos}"
    r = tried.loc[tried["peak_received"].idxmax()]
    lam = "" if r["lam"] != r["lam"] else f" lambda={r['lam']:g}"
    made = "made" if float(r["peak_received"]) > eps else "no intervention made"
    subject = f"{r['intervention']}{lam} {made}" if made == "made" else made
    return (f"{subject} position {pos} a sink: largest attention it receives, any layer: "
            f"{float(r['peak_received']):.3f} ({r['intervention']}{lam}); eps={eps:g}")


def plot_training_curves(logs: Mapping[str, Mapping[str, Any]], *, smooth: int = 50) -> Figure:
    """Training (smoothed) and validation loss per run: ``{name: log.json contents}``."""
    fig, ax = _subplots(figsize=(7, 4))
    for i, (name, log) in enumerate(logs.items()):
        tr = np.asarray(log.get("train", []), dtype=float)
        if len(tr):
            k = max(1, min(smooth, len(tr) // 5 or 1))
            sm = np.convolve(tr[:, 1], np.ones(k) / k, mode="valid")
            ax.plot(tr[k - 1 :, 0], sm, color=f"C{i}", alpha=0.6, lw=1)
        va = np.asarray(log.get("val", []), dtype=float)
        if len(va):
            ax.plot(va[:, 0], va[:, 1], color=f"C{i}", marker="o", ms=3, label=f"{name} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_to_html(fig: Figure, *, alt: str = "figure", dpi: int = 110) -> str:
    """``<img>`` with the figure as a base64 PNG (no external files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{alt}" src="data:image/png;base64,{data}" style="max-width: 100%;">'


__all__: Sequence[str] = [
    "figure_to_html",
    "plot_intervention_sweep",
    "plot_massive_activations",
    "plot_sink_heatmap",
    "plot_training_curves",
    "plot_value_aggregation",
]
