"""One self-contained HTML report: the chain in numbers, then every stage, the trace, figures and views.

The page opens with the causal chain as a short story: a one-line verdict and one table row per
link (value aggregation -> super neurons -> dimension disparity -> sink -> loss) with what the
scan measured and, when the chain was traced (:func:`tl_sinks.trace.trace_chain`), what the
intervention changed. The details follow in the same order, then one prompt shown interactively
and the provenance.

The page embeds the circuitsvis bundle once (so the interactive views render with no network),
figures as base64 PNGs, and tables as HTML. ``tl-sinks report`` writes it from the command line.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tl_sinks._compat import ModelInfo, inspect_model, model_device
from tl_sinks._inputs import PreparedPrompts
from tl_sinks._io import atomic_write_text
from tl_sinks._progress import tqdm
from tl_sinks._types import ModelLike
from tl_sinks.results import fmt_number, fmt_ratio
from tl_sinks.scan import ScanResult, builtin_prompts, prepare_corpus, scan
from tl_sinks.sinks import uniform_received

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
.verdict { font-size: 1.15em; font-weight: 600; margin: 14px 0 6px; padding: 10px 14px; background: #eef4ff;
           border-left: 4px solid #3b6fd8; }
table.story { font-size: 0.9em; width: 100%; }
table.story td, table.story th { text-align: left; vertical-align: top; padding: 6px 8px; }
table.story td.link { font-weight: 600; white-space: nowrap; }
table.story td.effect b { color: #1a3f99; }
table.story td.untested { color: #777; font-style: italic; }
table.prov td { text-align: left; } table.prov td.key { color: #555; font-family: monospace; }
.small { font-size: 0.8em; color: #666; }
"""

_REPORT_STEPS = ("scan: every stage in one pass", "trace the chain: ablation, loss and the position interventions",
                 "one prompt, interactively", "figures and the page")


# --------------------------------------------------------------------------- numbers in words
def fmt_change(baseline: float, intervened: float) -> str:
    """``"14 → 0.163 (-99%)"`` (plain text); a change of 10x or more as a factor (``"0.01 -> 1 (100x)"``)."""
    text = f"{fmt_number(baseline)} \u2192 {fmt_number(intervened)}"
    if baseline == 0 or not math.isfinite(baseline) or not math.isfinite(intervened):
        return text
    rel = (intervened - baseline) / abs(baseline)
    return text + (f" ({fmt_percent(rel, sign=True)})" if abs(rel) < 9.5 else f" ({fmt_ratio(intervened / baseline)})")


def fmt_percent(rel: float, *, sign: bool = False) -> str:
    """A relative change as a percentage that does not round to a claim the data do not make:
    ``-0.9988`` is ``"-99.9%"``, not ``"-100%"``; ``0.003`` is ``"+0.3%"``, not ``"+0%"``.

    Example:
        >>> [fmt_percent(r, sign=True) for r in (-0.9883, -0.9988, -1.0, 0.003, 0.0, 0.128)]
        ['-99%', '-99.9%', '-100%', '+0.3%', '+0%', '+13%']
    """
    spec = "+" if sign else ""
    coarse = f"{rel:{spec}.0%}"
    if rel != 0 and (round(abs(rel) * 100) in (0, 100)) and abs(rel) != 1:
        fine = f"{rel:{spec}.1%}"
        return fine if fine.lstrip("+-") not in ("0.0%", "100.0%") else f"{rel:{spec}.2%}"
    return coarse


def _change_html(baseline: float, intervened: float) -> str:
    """:func:`fmt_change` for the story table, the change in bold."""
    text = html.escape(fmt_change(baseline, intervened))
    head, sep, tail = text.partition(" (")
    return f"{head}{sep}<b>{tail[:-1]}</b>)" if sep else text


def _share_words(rel: float, what: str) -> str:
    """How a relative change reads in a sentence: ``"removes 99% of dim 81"``."""
    if not math.isfinite(rel):
        return f"changes {what}"
    if abs(rel) < 0.005:
        return f"leaves {what} unchanged"
    return f"removes {fmt_percent(-rel)} of {what}" if rel < 0 else f"raises {what} by {fmt_percent(rel)}"


# --------------------------------------------------------------------------- the story
def _links(trace: Any) -> dict[str, Any]:
    """The trace's links table by what each row measures: ``dim``, ``ratio``, ``rate``, ``attn``, ``loss``."""
    out: dict[str, Any] = {}
    if trace is None:
        return out
    for r in trace.links.itertuples():
        key = ("dim" if "massive dim" in r.link else "ratio" if "disparity" in r.link
               else "loss" if "loss" in r.link else "rate" if "sink rate" in r.metric else "attn")
        out.setdefault(key, r)
    return out


def _chain_writer(result: ScanResult) -> tuple[Any, int | None, bool]:
    """(the super neuron row the story names, the largest first-token dim, whether it writes that dim)."""
    dim = int(result.summary()["massive_dim_pos0"]) if result.disparity is not None else None
    sn = result.super_neurons
    if sn is None or not len(sn.found):
        return None, dim, False
    candidates = sn.chain if len(sn.chain) else sn.found
    for r in candidates.itertuples():
        if dim is not None and dim in [int(d) for d in r.top_dims]:
            return r, dim, True
    return next(candidates.itertuples()), dim, False


def verdict(result: ScanResult, trace: Any = None, *, not_traced: str = "the causal links were not traced") -> str:
    """One sentence: which super neuron writes which dim at the first token, and (with a trace) what
    ablating the chain super neurons did to that dim and to the sink. Plain text."""
    neuron, dim, writes = _chain_writer(result)
    if neuron is not None and writes:
        head = f"Super neuron {neuron.label} writes dim {dim} at the first token"
    elif neuron is not None and dim is not None:
        head = (f"The largest first-token dim is {dim}, but super neuron {neuron.label} does not write it "
                f"(its down row's top dims: {', '.join(str(int(d)) for d in neuron.top_dims)})")
    elif dim is not None:
        head = f"No super neuron found; the largest first-token dim is {dim}"
    else:
        head = "No super neuron or dimension-disparity stage ran"
    links = _links(trace)
    if trace is None:
        return f"{head}; {not_traced}."
    if not trace.neurons or "dim" not in links:
        return f"{head}; the ablation was not run ({trace.meta.get('ablation_note') or 'no super neurons to ablate'})."
    which = "chain super neurons" if trace.meta.get("ablation_selection") == "chain" else "first-token super neurons"
    d, s = links["dim"], links.get("rate")
    tail = _share_words(d.relative, f"dim {dim}" if dim is not None else "the massive dim")
    if s is not None:
        sink = _share_words(s.relative, "the sink")
        if sink.split()[0] == tail.split()[0]:  # "removes 99% of dim 81 and 62% of the sink"
            sink = sink.split(" ", 1)[1]
        tail += f" and {sink} (sink rate {fmt_change(s.baseline, s.intervened).split(' (')[0]})"
    return f"{head}; ablating the {which} ({', '.join(trace.meta.get('ablated', []))}) there {tail}."


def _row(link: str, anchor: str, measured: str, test: str | None, effect: str | None) -> str:
    def cell(text: str | None, cls: str) -> str:
        if text is None:
            return "<td class='untested'>not traced</td>"
        return f"<td class='{cls}'>{text}</td>"

    return (f"<tr><td class='link'><a href='#{anchor}'>{html.escape(link)}</a></td><td>{measured}</td>"
            f"{cell(test, 'test')}{cell(effect, 'effect')}</tr>")


def _aggregation_row(result: ScanResult, trace: Any) -> str:
    e = html.escape
    s = result.summary()
    if result.aggregation is None:
        measured = "not measured (stage skipped)"
    else:
        measured = (f"variance of each head's attention output (<code>hook_z</code>) at the first token over that at "
                    f"the rest: median {fmt_number(s['var_ratio_first_rest_median'])} over heads; larger at the first "
                    f"token in {s['share_heads_var_first_gt_rest']:.0%} of heads (the paper's variance discrepancy: above 1)")
    if trace is None:
        return _row("value aggregation", "aggregation", measured, None, None)
    peak = trace.peak_received()
    eps = float(trace.meta.get("eps", 0.3))
    lams = [float(x) for x in trace.meta.get("lambdas", [])]
    test = (f"make position {trace.pos} aggregate like the first token: self-only mask; amplify its deviation "
            f"(lambda up to {fmt_number(max(lams)) if lams else '?'}); control: scale its output")
    best = lambda name: float(peak.loc[peak["intervention"] == name, "peak_received"].max())  # noqa: E731
    tried = peak[peak["intervention"] != "none"]
    top = float(tried["peak_received"].max()) if len(tried) else float("nan")
    made = "a sink formed" if top > eps else "no sink formed"
    effect = (f"<b>{made}</b> (sink threshold eps={fmt_number(eps)}): attention to position {trace.pos}, peak over "
              f"layers: {fmt_number(best('none'))} without intervention; self-only mask {fmt_number(best('self_only_mask'))}; "
              f"amplified up to {fmt_number(best('amplify_deviation'))}; control up to {fmt_number(best('scale_output'))}")
    return _row("value aggregation", "aggregation", measured, e(test), effect)


def _super_neuron_row(result: ScanResult, trace: Any) -> str:
    e = html.escape
    sn = result.super_neurons
    if sn is None:
        measured = f"not measured: {e(result.skipped.get('super_neurons', 'stage skipped'))}"
    elif not len(sn.found):
        measured = "none found"
    else:
        chain, other = sn.chain, sn.found[sn.found["role"] != "chain"]
        top = chain.iloc[0] if len(chain) else sn.found.iloc[0]
        measured = (f"{len(chain)} chain super neuron(s) {e(', '.join(chain['label'])) or '(none)'} "
                    f"(fire at the first token, channel-sparse down row); {e(top['label'])} peaks at "
                    f"{fmt_number(top['max_value'])} at {e(repr(str(top['str_token'])))} (position {int(top['max_pos'])}), "
                    f"{fmt_ratio(top['position_ratio'])} its mean elsewhere; down row kurtosis {fmt_number(top['down_kurtosis'])}, "
                    f"top dims {', '.join(str(int(d)) for d in top['top_dims'])}")
        if len(other):
            measured += f"; {len(other)} other high-ratio neuron(s) ({e(', '.join(other['label']))}) are not part of the chain"
    if trace is None:
        return _row("super neurons", "super-neurons", measured, None, None)
    if not trace.neurons:
        note = trace.meta.get("ablation_note") or "no super neurons to ablate"
        return _row("super neurons", "super-neurons", measured, e(f"not run: {note}"), "&mdash;")
    test = f"mean-ablate {', '.join(trace.meta.get('ablated', []))} at position 0 (each set to its mean over positions >= 1)"
    return _row("super neurons", "super-neurons", measured, e(test), "effects in the rows below")


def _disparity_row(result: ScanResult, trace: Any) -> str:
    e = html.escape
    if result.disparity is None:
        measured = "not measured (stage skipped)"
    else:
        s = result.summary()
        neuron, dim, writes = _chain_writer(result)
        who = ""
        if neuron is not None:
            who = (f"; written by super neuron {e(neuron.label)}: <b>{'yes' if writes else 'no'}</b> "
                   f"(its down row's top dims: {', '.join(str(int(d)) for d in neuron.top_dims)})")
        sun = ", ".join(f"{d} (layers {a}-{b})" for d, a, b, _ in s["sun_massive_dims_pos0"]) or "none"
        measured = (f"largest first-token dim {s['massive_dim_pos0']}: mean |x| {fmt_number(s['massive_dim_value'])} "
                    f"after block {s['massive_dim_layer']}, {fmt_ratio(s['massive_dim_ratio_to_median'])} the token's median"
                    f"{who}; paper ratio at position 0 {fmt_number(s['disparity_pos0_attn_in'])} "
                    f"(other positions {fmt_number(s['disparity_rest_attn_in'])}); Sun-massive dims at position 0: {e(sun)}")
    links = _links(trace)
    if trace is None:
        return _row("dimension disparity", "disparity", measured, None, None)
    if "dim" not in links:
        return _row("dimension disparity", "disparity", measured, "not run", "&mdash;")
    d, r = links["dim"], links.get("ratio")
    effect = f"{e(d.metric)}: {_change_html(d.baseline, d.intervened)}"
    if r is not None:
        effect += f"<br>{e(r.metric)}: {_change_html(r.baseline, r.intervened)}"
    return _row("dimension disparity", "disparity", measured, "the same ablation", effect)


def _sink_row(result: ScanResult, trace: Any) -> str:
    if result.sinks is None:
        measured = "not measured (stage skipped)"
    else:
        s = result.summary()
        n_heads = int(result.sinks.values.shape[0] * result.sinks.values.shape[1])
        measured = (f"sink rate at position 0 {fmt_number(s['sink_rate_pos0'])} (share of heads whose attention to it exceeds "
                    f"eps={fmt_number(result.sinks.eps)}, per prompt; the mean over prompts exceeds it in "
                    f"{s['n_sink_heads_pos0']} of {n_heads} heads); mean attention received {fmt_number(s['mean_received_pos0'])}, "
                    f"{fmt_ratio(s['ratio_to_uniform_pos0'])} uniform ({fmt_number(s['uniform_pos0'])})")
    links = _links(trace)
    if trace is None:
        return _row("sink", "sinks", measured, None, None)
    if "rate" not in links:
        return _row("sink", "sinks", measured, "not run", "&mdash;")
    effect = "<br>".join(f"{html.escape(r.metric)}: {_change_html(r.baseline, r.intervened)}"
                         for r in (links["rate"], links.get("attn")) if r is not None)
    return _row("sink", "sinks", measured, "the same ablation", effect)


def _loss_row(trace: Any) -> str:
    links = _links(trace)
    measured = "next-token loss on the prompts (measured by the trace only)"
    if trace is None:
        return _row("loss", "trace", measured, None, None)
    if "loss" not in links:
        return _row("loss", "trace", measured, "not run", "&mdash;")
    loss = links["loss"]
    return _row("loss", "trace", measured, "the same ablation", f"next-token loss: {_change_html(loss.baseline, loss.intervened)}")


def story_html(result: ScanResult, trace: Any = None, *, not_traced: str = "the causal links were not traced") -> str:
    """The opening of the report: the verdict and one table row per link of the chain."""
    rows = [_aggregation_row(result, trace), _super_neuron_row(result, trace), _disparity_row(result, trace),
            _sink_row(result, trace), _loss_row(trace)]
    n = f"{result.meta.get('n_prompts')} prompts, {result.meta.get('n_tokens')} tokens"
    out = [f"<p class='verdict' id='verdict'>{html.escape(verdict(result, trace, not_traced=not_traced))}</p>",
           "<table class='story' id='story'><thead><tr><th>link</th>"
           f"<th>measured (scan of {html.escape(n)})</th><th>causal test (trace)</th><th>effect of the test</th>"
           "</tr></thead><tbody>", *rows, "</tbody></table>"]
    if trace is None:
        out.append(f"<p class='note'>{html.escape(not_traced[0].upper() + not_traced[1:])}: the table shows what the "
                   "scan measured; the interventions that test each link ran only with the trace.</p>")
    return "\n".join(out)


def plain_summary(result: ScanResult) -> str:
    """``result.report()`` with the attention type said once (the header has it; stages repeated it)."""
    lines = result.report().splitlines()
    said = f"attention: {result.meta.get('attention')}"
    return "\n".join([lines[0], *(ln for ln in lines[1:] if ln.strip() != said)])


# --------------------------------------------------------------------------- provenance
def model_label(name: str) -> tuple[str, str | None]:
    """``(short name, full path or None)``: a local directory is shown by its folder's name."""
    text = str(name)
    if os.sep in text or (os.altsep and os.altsep in text) or Path(text).exists():
        short = Path(text).name or text
        return short, text
    return text, None


def _flatten(meta: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in meta.items():
        if isinstance(v, Mapping) and v:
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _fmt_meta(v: Any) -> str:
    if isinstance(v, float):
        return fmt_number(v, 4)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_meta(x) for x in v) if len(v) else "none"
    if isinstance(v, Mapping):
        return "none"
    return str(v)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("tl_sinks", "transformer_lens", "transformers", "torch", "circuitsvis"):
        try:
            out[dist] = metadata.version(dist if dist != "transformer_lens" else "transformer-lens")
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["torch"] = torch.__version__
    return out


def provenance_html(meta: Mapping[str, Any], trace_meta: Mapping[str, Any] | None = None) -> str:
    """Two columns: the model by its name (full path below), the library versions, then every
    meta entry with nested dicts flattened (``processing.fold_ln``)."""
    e = html.escape
    short, full = model_label(str(meta.get("model_name", "")))
    model = f"{e(short)}" + (f"<br><span class='small'>{e(full)}</span>" if full else "")
    rows = [("model", model)] + [(f"{k} version", e(v)) for k, v in _versions().items()]
    shown = {"model_name"} | {f"{d}_version" for d in _versions()}  # already in the rows above
    rows += [(k, e(_fmt_meta(v))) for k, v in _flatten(meta) if k not in shown]
    if trace_meta:
        rows += [(f"trace.{k}", e(_fmt_meta(v))) for k, v in _flatten(trace_meta)
                 if k.split(".")[0] not in meta and v is not None]
    body = "".join(f"<tr><td class='key'>{e(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='prov'>{body}</table>"


# --------------------------------------------------------------------------- details
def _table(df: Any, n: int = 20) -> str:
    return df.head(n).to_html(index=False, float_format=fmt_number, border=0)


def _uniform_at(info: ModelInfo, corpus: PreparedPrompts, pos: int) -> float | None:
    """Mean attention ``pos`` would receive from the queries after it under uniform attention,
    over the prompts that have such a query (as the trace's sweep averages)."""
    seqs = corpus.sequences
    lengths = torch.tensor([len(s) for s in seqs])
    if int(lengths.max()) <= pos + 1:
        return None
    u = uniform_received(lengths, pos + 1, causal=info.causal, exclude_self=True)[:, pos]
    counted = lengths > pos + 1
    return float(u[counted].mean())


def _str_tokens(model: ModelLike, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(int(t)) for t in tokens[0]]
    return [model.tokenizer.decode([int(t)]) for t in tokens[0]]


def _example_views(model: ModelLike, result: ScanResult, prompt: Any, max_heads: int = 12) -> list[tuple[str, Any]]:
    """Attention, token-colouring and neuron views for one prompt."""
    from tl_sinks.viz import show_attention, show_neuron_activations, show_tokens

    info = inspect_model(model)
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt, truncate=False)
    else:
        tokens = torch.as_tensor(prompt).reshape(1, -1)
    tokens = tokens.to(model_device(model))
    str_tokens = _str_tokens(model, tokens)
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
        f"Attention of the {len(heads)} heads that attend most to position 0 over the corpus (strongest first; "
        "the number after each name is its mean attention to position 0 on this prompt)",
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
        "Tokens coloured by the mean attention they receive (over layers, heads and the queries that see them; "
        "0 to 1) and by their largest residual-stream norm over layers (divided by the largest on the prompt). "
        "One colour scale for both, white at 0, full blue at 1.",
        show_tokens(str_tokens, torch.stack([per_key, norms / norms.max()], -1),
                    labels=["attention received", "residual norm / max"], max_abs=1.0),
    ))
    if found is not None and len(found):
        acts = torch.stack([cache[f"blocks.{int(r.layer)}.mlp.hook_post"][0, :, int(r.neuron)] for r in found.itertuples()], -1)
        labels = [f"{r.label} ({r.role})" if hasattr(r, "role") else r.label for r in found.itertuples()]
        view = show_neuron_activations(str_tokens, acts, neuron_labels=labels)
        top = float(view.props["positiveBounds"][0])
        i, j = divmod(int(acts.abs().argmax()), acts.shape[1])
        views.append((
            "Super-neuron activations (hook_post) over the text: click a neuron's name to colour by it, hover a token "
            f"for every neuron's value. One colour scale for all neurons: blue positive, red negative, white 0, full "
            f"colour at |activation| = {fmt_number(top)} (the largest: {labels[j]} at {str_tokens[i]!r}, position {i}).",
            view,
        ))
    return views


def _trace_html(t: Any) -> str:
    """The trace's two tables: the ablation links (baseline, intervened, change) and, per
    intervention at ``t.pos``, the peak attention it receives."""
    e = html.escape
    out = []
    if t.neurons and len(t.links):
        out.append(f"<p>Mean-ablating {e(', '.join(t.meta.get('ablated', [])))} at position 0 "
                   f"({e(str(t.meta.get('ablation_note', '')))}):</p>")
        rows = "".join(f"<tr><td>{e(r.link)}</td><td>{e(r.metric)}</td><td>{fmt_number(r.baseline)}</td>"
                       f"<td>{fmt_number(r.intervened)}</td><td>{_change_html(r.baseline, r.intervened).partition(' (')[2][:-1]}</td></tr>"
                       for r in t.links.itertuples())
        out.append("<table><thead><tr><th>link</th><th>metric</th><th>baseline</th><th>ablated</th><th>change</th></tr>"
                   f"</thead><tbody>{rows}</tbody></table>")
    else:
        out.append(f"<p class='note'>Ablation not run: {e(str(t.meta.get('ablation_note') or 'no super neurons'))}.</p>")
    peak = t.peak_received()
    rows = "".join(
        f"<tr><td>{e(r.intervention)}</td><td>{'' if r.lam != r.lam else fmt_number(r.lam)}</td>"
        f"<td>{fmt_number(r.peak_received)}</td><td>{int(r.peak_layer)}</td><td>{fmt_number(r.peak_sink_rate)}</td></tr>"
        for r in peak.itertuples())
    out.append(f"<p>Interventions at position {t.pos}: the largest attention it receives in any layer (mean over heads, "
               f"prompts and the later queries), the layer where it is largest, and the largest sink rate at position {t.pos} over layers:</p>"
               "<table><thead><tr><th>intervention</th><th>lambda</th><th>peak attention</th><th>layer</th>"
               f"<th>sink rate</th></tr></thead><tbody>{rows}</tbody></table>")
    return "\n".join(out)


def _details(result: ScanResult, t: Any, trace_note: str | None, uniform: float | None) -> list[str]:
    from tl_sinks.viz import (
        figure_to_html,
        plot_intervention_sweep,
        plot_massive_activations,
        plot_sink_heatmap,
        plot_value_aggregation,
    )

    parts: list[str] = []
    n = iter(range(1, 10))
    if result.aggregation is not None:
        parts.append(f"<h2 id='aggregation'>{next(n)}. Value aggregation</h2>"
                     + figure_to_html(plot_value_aggregation(result.aggregation), alt="value aggregation"))
        parts.append("<p>Per layer, variance at position 0 over the rest:</p>" + _table(result.aggregation.layer_ratio().to_frame()))
    if result.super_neurons is not None:
        cols = ["label", "role", "max_value", "max_pos", "str_token", "position_ratio", "down_kurtosis", "top_dims", "top1_share"]
        f = result.super_neurons.found
        cols = [c for c in cols if c in f.columns]
        parts.append(f"<h2 id='super-neurons'>{next(n)}. Super neurons</h2>" + (_table(f[cols]) if len(f) else "<p class='note'>none found</p>"))
    if result.disparity is not None:
        parts.append(f"<h2 id='disparity'>{next(n)}. Dimension disparity</h2>"
                     + figure_to_html(plot_massive_activations(result.disparity), alt="largest first-token residual dims"))
        md = result.disparity.massive_dims()
        parts.append("<p>Massive dims (Sun et al.: |x| &gt; 100 and &gt; 1000x the token's median):</p>"
                     + (_table(md) if len(md) else "<p class='note'>none</p>"))
        parts.append("<p>Largest first-token dim per layer:</p>" + _table(result.disparity.top_dims()))
    if result.sinks is not None:
        parts.append(f"<h2 id='sinks'>{next(n)}. Sinks</h2>" + figure_to_html(plot_sink_heatmap(result.sinks), alt="sink heatmap"))
        parts.append("<p>Sink rate by layer (position 0):</p>" + _table(result.sinks.sink_rate_by_layer(0).to_frame()))
        sec = result.sinks.detect_sinks()
        parts.append("<p>Other sinks:</p>" + (_table(sec) if len(sec) else "<p class='note'>none above threshold</p>"))
    if t is not None:
        parts.append(f"<h2 id='trace'>{next(n)}. The causal chain, traced</h2>" + _trace_html(t))
        parts.append(figure_to_html(plot_intervention_sweep(t, uniform=uniform), alt="intervention sweep"))
    elif trace_note:
        parts.append(f"<h2 id='trace'>{next(n)}. The causal chain, traced</h2><p class='note'>{html.escape(trace_note)}</p>")
    parts.append(f"<h2 id='views'>{next(n)}. One prompt, interactively</h2>"
                 "<p class='note'>The first prompt of the corpus, run once with the model as it is.</p>")
    return parts


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
            about 15 more times), with the report's scan as its baseline (``base=``), not a second scan.
        batch_size: Prompts per forward pass.
        progress: Show progress bars: one for the report's steps, and the bars of the stages
            each step runs.
        title: Page title.

    Returns:
        The page as a string.
    """
    from tl_sinks.trace import trace_chain
    from tl_sinks.viz import circuitsvis_bundle

    prompts = builtin_prompts() if prompts is None else prompts
    info = inspect_model(model)
    corpus = prepare_corpus(model, prompts, info=info)  # once: the scan, the trace and the baseline read it
    run_trace = trace and info.causal
    names = [s for i, s in enumerate(_REPORT_STEPS) if i != 1 or run_trace]
    # The report's own bar names the step; the bars of the stages it runs appear below it.
    steps = tqdm(total=len(names), disable=not progress, unit="step", leave=False)

    def step(name: str) -> None:
        i = names.index(name)
        steps.set_description_str(f"tl_sinks report, step {i + 1}/{len(names)}: {name}")
        steps.update(i - steps.n)

    try:
        step(_REPORT_STEPS[0])
        result = scan(model, corpus, batch_size=batch_size, progress=progress)
        t, trace_note, uniform = None, None, None
        if run_trace:
            step(_REPORT_STEPS[1])
            t = trace_chain(model, corpus, batch_size=batch_size, progress=progress, base=result)
            uniform = _uniform_at(info, corpus, t.pos)
        elif trace:
            trace_note = ("not traced: the position interventions and the loss link are defined for causal "
                          "decoders; this model's attention is bidirectional")
        not_traced = trace_note or "the causal links were not traced (the report was made without the trace)"
        step(_REPORT_STEPS[2])
        example = prompts[0]
        views = _example_views(model, result, example)
        step(_REPORT_STEPS[3])
        short, _ = model_label(info.model_name)
        title = title or f"tl_sinks report: {short}"
        parts = [f"<h1>{html.escape(title)}</h1>",
                 f"<p class='note'>{html.escape(info.architecture)}, {'causal' if info.causal else 'bidirectional'} attention, "
                 f"{'post' if info.post_ln else 'pre'}-LN, {info.n_layers} layers x {info.n_heads} heads; "
                 f"{html.escape(str(result.meta.get('n_prompts')))} prompts, {html.escape(str(result.meta.get('n_tokens')))} tokens. "
                 f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} by tl_sinks.</p>",
                 "<h2 id='chain'>The chain in numbers</h2>", story_html(result, t, not_traced=not_traced),
                 "<details><summary>The scan's findings as <code>tl-sinks scan</code> prints them</summary><pre>"
                 + html.escape(plain_summary(result)) + "</pre></details>"]
        parts += _details(result, t, trace_note, uniform)
        parts += [f"<p>{html.escape(caption)}</p>" + view.fragment() for caption, view in views]
        parts.append(f"<h2 id='provenance'>Provenance</h2>{provenance_html(result.meta, t.meta if t is not None else None)}")
        steps.update(1)
    finally:
        steps.close()
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{circuitsvis_bundle()}</script></head><body>\n" + "\n".join(parts) + "\n</body></html>"
    )


def write_report(model: ModelLike, out: str | Path, prompts: Any = None, **kw: Any) -> Path:
    """Write :func:`build_report` to ``out`` atomically: an existing file is replaced only once
    the whole page is on disk (see :mod:`tl_sinks._io`)."""
    return atomic_write_text(Path(out), build_report(model, prompts, **kw))
