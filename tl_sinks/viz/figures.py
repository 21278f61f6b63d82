"""Static matplotlib figures built from result objects (``plot_*`` return a Figure, never show it).

Each figure is drawn from a result's tensors, so it is reproducible from the saved numbers and
works offline; :func:`figure_to_html` embeds one in a page as a base64 PNG.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are returned, never shown
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_sink_heatmap(sinks: Any, pos: int = 0) -> Figure:
    """Layer x head heatmap of the mean attention received by ``pos``, heads above eps outlined."""
    v = sinks.values[:, :, pos].numpy()
    # Wide enough for the two-line title even with few heads.
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.45 * v.shape[1]), 1.4 + 0.4 * v.shape[0]))
    im = ax.imshow(v, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for layer, head in zip(*np.nonzero(v > sinks.eps)):
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="white", lw=1.5))
    ax.set_xlabel("head_index")
    ax.set_ylabel("layer")
    ax.set_title(f"attention received by position {pos}\n(outlined: > eps={sinks.eps}); sink rate {sinks.sink_rate(pos):.2f}", fontsize=9)
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
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, var.shape[0]))
    for layer, c in enumerate(colors):
        ax.plot(pos, var[layer][n], color=c, marker="o", ms=3, label=f"layer {layer}")
        ax.plot(pos, exp[layer][n], color=c, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("variance of hook_z over heads x d_head")
    ax.set_title(f"value aggregation ({agg.meta.get('attention', '?')}); dashed: var(first)/(t+1)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_massive_activations(disp: Any, layer: int | None = None, top: int = 16) -> Figure:
    """Bars of the largest first-token residual dims at ``layer`` (default: where the largest is),
    against each dim's largest value at other positions."""
    fm = disp.first_mean_abs
    layer = int(fm.max(1).values.argmax()) if layer is None else layer
    order = fm[layer].argsort(descending=True)[:top].numpy()
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(x - 0.2, fm[layer][order].numpy(), width=0.4, label="mean |x| at position 0")
    ax.bar(x + 0.2, disp.rest_max_abs[layer][order].numpy(), width=0.4, label="max |x| at positions >= 1")
    ax.set_xticks(x, [str(d) for d in order], rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("residual dim")
    ax.set_title(f"massive activations after block {layer}; median |x| at pos 0: {float(disp.median[layer, 0]):.3g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_intervention_sweep(trace: Any) -> Figure:
    """Attention received by the intervened position vs lambda (peak over layers), and per layer."""
    sw = trace.sweep
    peak = trace.peak_received()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, marker in (("amplify_deviation", "o"), ("scale_output", "s")):
        d = peak[peak["intervention"] == name]
        a.plot(d["lam"], d["peak_received"], marker=marker, label=name)
    for name, ls in (("self_only_mask", "-"), ("none", ":")):
        d = peak[peak["intervention"] == name]
        if len(d):
            a.axhline(float(d["peak_received"].iloc[0]), ls=ls, color="k" if name == "none" else "C2", label=name)
    a.set_xlabel("lambda")
    a.set_ylabel(f"attention to position {trace.pos} (peak over layers)")
    a.legend(fontsize=8)
    for name in ("none", "self_only_mask"):
        d = sw[sw["intervention"] == name]
        b.plot(d["layer"], d["received"], marker="o", label=name)
    lam_max = sw["lam"].max()
    for name in ("amplify_deviation", "scale_output"):
        d = sw[(sw["intervention"] == name) & (sw["lam"] == lam_max)]
        b.plot(d["layer"], d["received"], marker=".", label=f"{name} lambda={lam_max:g}")
    b.set_xlabel("layer")
    b.set_ylabel(f"attention to position {trace.pos}")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_training_curves(logs: Mapping[str, Mapping[str, Any]], *, smooth: int = 50) -> Figure:
    """Training (smoothed) and validation loss per run: ``{name: log.json contents}``."""
    fig, ax = plt.subplots(figsize=(7, 4))
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
    """``<img>`` with the figure as a base64 PNG (no external files); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
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
