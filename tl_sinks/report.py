"""One self-contained HTML report: every stage, the chain trace, figures and circuitsvis views.

The page embeds the circuitsvis bundle once (so the interactive views render with no network),
figures as base64 PNGs, and tables as HTML. ``tl-sinks report`` writes it from the command line.
"""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Any

import torch

from tl_sinks._compat import inspect_model, model_device
from tl_sinks._io import atomic_write_text
from tl_sinks._types import ModelLike
from tl_sinks.results import meta_html
from tl_sinks.scan import ScanResult, builtin_prompts, scan

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def _table(df: Any, n: int = 20) -> str:
    return df.head(n).to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0)


def _example_views(model: ModelLike, result: ScanResult, prompt: Any, max_heads: int = 12) -> list[tuple[str, Any]]:
    """Attention, token-colouring and neuron views for one prompt."""
    from tl_sinks.viz import show_attention, show_neuron_activations, show_tokens

    info = inspect_model(model)
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt, truncate=False)
    else:
        tokens = torch.as_tensor(prompt).reshape(1, -1)
    tokens = tokens.to(model_device(model))
    str_tokens = [model.tokenizer.decode([int(t)]) for t in tokens[0]] if model.tokenizer is not None else [str(int(t)) for t in tokens[0]]
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(info.n_layers)]
    names += [info.resid_site(layer) for layer in range(info.n_layers)]
    found = result.super_neurons.found if result.super_neurons is not None else None
    if found is not None and len(found):
        names += [f"blocks.{int(layer)}.mlp.hook_post" for layer in sorted(set(found["layer"]))]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=list(dict.fromkeys(names)))
    sinks = result.sinks
    strength = sinks.values[:, :, 0] if sinks is not None else torch.zeros(info.n_layers, info.n_heads)
    order = torch.argsort(strength.flatten(), descending=True)[:max_heads]
    heads = [(int(i) // info.n_heads, int(i) % info.n_heads) for i in order]
    pattern = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, h] for layer, h in heads])
    views = [(
        f"Attention of the {len(heads)} heads that attend most to position 0 over the corpus (strongest first)",
        show_attention(pattern, str_tokens, head_names=[f"L{layer}H{h}" for layer, h in heads], causal=info.causal),
    )]
    received = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(info.n_layers)])
    if info.causal:
        T = received.shape[-1]
        per_key = received.sum((0, 1, 2)) / (info.n_layers * info.n_heads * (T - torch.arange(T)).clamp_min(1))
    else:
        per_key = received.mean((0, 1, 2))
    norms = torch.stack([cache[info.resid_site(layer)][0].norm(dim=-1) for layer in range(info.n_layers)]).max(0).values
    views.append((
        "Tokens coloured by mean attention received (over layers, heads and the queries that see them) and by the "
        "largest residual-stream norm over layers",
        show_tokens(str_tokens, torch.stack([per_key, norms / norms.max()], -1), labels=["attention received", "residual norm (max over layers, scaled)"]),
    ))
    if found is not None and len(found):
        acts = torch.stack([cache[f"blocks.{int(r.layer)}.mlp.hook_post"][0, :, int(r.neuron)] for r in found.itertuples()], -1)
        views.append(("Super-neuron activations over the text", show_neuron_activations(str_tokens, acts, neuron_labels=list(found["label"]))))
    return views


def build_report(
    model: ModelLike,
    prompts: Any = None,
    *,
    trace: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    title: str | None = None,
) -> str:
    """The HTML report for ``model`` on ``prompts`` (default: the built-in prompts).

    Args:
        model: A TransformerBridge in eval mode.
        prompts: Strings or token ids.
        trace: Also run :func:`tl_sinks.trace.trace_chain` (causal models only; it runs the corpus
            about 15 more times).
        batch_size: Prompts per forward pass.
        progress: Show progress bars.
        title: Page title.

    Returns:
        The page as a string.
    """
    from tl_sinks.trace import trace_chain
    from tl_sinks.viz import (
        circuitsvis_bundle,
        figure_to_html,
        plot_intervention_sweep,
        plot_massive_activations,
        plot_sink_heatmap,
        plot_value_aggregation,
    )

    prompts = builtin_prompts() if prompts is None else prompts
    info = inspect_model(model)
    result = scan(model, prompts, batch_size=batch_size, progress=progress)
    parts: list[str] = []
    title = title or f"tl_sinks report: {Path(info.model_name).name or info.model_name}"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(f"<p class='note'>{html.escape(info.architecture)}, {'causal' if info.causal else 'bidirectional'} attention, "
                 f"{'post' if info.post_ln else 'pre'}-LN, {info.n_layers} layers x {info.n_heads} heads; "
                 f"{html.escape(str(result.meta.get('n_prompts')))} prompts, {html.escape(str(result.meta.get('n_tokens')))} tokens. Generated "
                 f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} by tl_sinks.</p>")
    parts.append("<h2>Findings</h2><pre>" + html.escape(result.report()) + "</pre>")
    if result.sinks is not None:
        parts.append("<h2>1. Sinks</h2>" + figure_to_html(plot_sink_heatmap(result.sinks), alt="sink heatmap"))
        parts.append("<p>Sink rate by layer (position 0):</p>" + _table(result.sinks.sink_rate_by_layer(0).to_frame()))
        sec = result.sinks.detect_sinks()
        parts.append("<p>Other sinks:</p>" + (_table(sec) if len(sec) else "<p class='note'>none above threshold</p>"))
    if result.aggregation is not None:
        parts.append("<h2>2. Value aggregation</h2>" + figure_to_html(plot_value_aggregation(result.aggregation), alt="value aggregation"))
        parts.append("<p>Per layer, variance at position 0 over the rest:</p>" + _table(result.aggregation.layer_ratio().to_frame()))
    if result.super_neurons is not None:
        cols = ["label", "max_value", "max_pos", "str_token", "position_ratio", "down_kurtosis", "top_dims", "top1_share"]
        f = result.super_neurons.found
        parts.append("<h2>3. Super neurons</h2>" + (_table(f[cols]) if len(f) else "<p class='note'>none found</p>"))
    if result.disparity is not None:
        parts.append("<h2>4. Dimension disparity</h2>" + figure_to_html(plot_massive_activations(result.disparity), alt="massive activations"))
        md = result.disparity.massive_dims()
        parts.append("<p>Massive dims (Sun et al. criterion):</p>" + (_table(md) if len(md) else "<p class='note'>none</p>"))
        parts.append("<p>Largest first-token dim per layer:</p>" + _table(result.disparity.top_dims()))
    if trace and info.causal:
        t = trace_chain(model, prompts, batch_size=batch_size, progress=progress)
        parts.append("<h2>5. The causal chain, traced</h2><pre>" + html.escape(t.report()) + "</pre>")
        parts.append(figure_to_html(plot_intervention_sweep(t), alt="intervention sweep"))
        if len(t.links):
            parts.append(_table(t.links))
    elif trace:
        parts.append("<h2>5. The causal chain, traced</h2><p class='note'>Skipped: the position interventions and the "
                     "loss link are defined for causal decoders; this model's attention is bidirectional.</p>")
    example = prompts[0] if not isinstance(prompts, torch.Tensor) else prompts[0]
    parts.append("<h2>6. One prompt, interactively</h2>")
    for caption, view in _example_views(model, result, example):
        parts.append(f"<p>{html.escape(caption)}</p>" + view.fragment())
    parts.append(f"<h2>Provenance</h2>{meta_html(result.meta)}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{circuitsvis_bundle()}</script></head><body>\n" + "\n".join(parts) + "\n</body></html>"
    )


def write_report(model: ModelLike, out: str | Path, prompts: Any = None, **kw: Any) -> Path:
    """Write :func:`build_report` to ``out`` atomically: an existing file is replaced only once
    the whole page is on disk (see :mod:`tl_sinks._io`)."""
    return atomic_write_text(Path(out), build_report(model, prompts, **kw))
