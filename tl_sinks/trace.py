"""Tracing the causal chain with interventions, each link with its effect size and baseline.

:func:`trace_chain` runs the links in order:

1. **Super neurons -> dimension disparity -> sink -> loss.** The chain super neurons found by the
   scan (first token, channel-sparse down row: ``SuperNeurons.chain``; if there are none, the
   neurons that fire at the first token with a dense row, and ``meta["ablation_selection"]`` says
   so), or the neurons given, are mean-ablated at the first token (:class:`~tl_sinks.interventions.AblateNeurons`,
   ``mode="mean"``: each neuron set to its mean over positions >= 1). Reported: the massive dim's
   first-token magnitude, the paper's disparity ratio, the sink rate and mean attention at
   position 0, and the next-token loss (causal models), each before and after.
2. **Interventions at a position p create a sink there.** :class:`~tl_sinks.interventions.SelfOnlyMask`
   and :class:`~tl_sinks.interventions.AmplifyDeviation` over a sweep of ``lambda``, against the
   control :class:`~tl_sinks.interventions.ScaleOutput` and no intervention: attention received
   by ``p`` per layer (mean over heads, prompts and the queries after ``p``) and the sink rate
   at ``p``.

Everything is measured with the same accumulating scan, so the cost is one forward pass per
batch per condition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from tl_sinks._compat import ModelInfo, inspect_model, require_hooks
from tl_sinks._driver import AccumulatorFactory
from tl_sinks._inputs import PreparedPrompts, TokenBatch
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.hooks import FiniteGuard
from tl_sinks.interventions import AblateNeurons, AmplifyDeviation, Intervention, ScaleOutput, SelfOnlyMask
from tl_sinks.results import SavableResult, meta_html
from tl_sinks.scan import ScanResult, builtin_prompts, plan_scan, prepare_corpus, run_stages
from tl_sinks.sinks import DEFAULT_EPS, SinkAccumulator, SinkScores
from tl_sinks.super_neurons import AblationTargets

DEFAULT_LAMBDAS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


class LossAccumulator:
    """Mean next-token cross-entropy over real tokens, from ``unembed.hook_out`` (causal models)."""

    stage = "loss"

    def __init__(self, model: ModelLike, info: ModelInfo) -> None:
        if not info.causal:
            raise ValueError("next-token loss is defined for causal models only")
        self.info = info
        require_hooks(model, self.hook_names(), stage=self.stage)
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def hook_names(self) -> list[str]:
        return ["unembed.hook_out"]

    def fwd_hooks(self, batch: TokenBatch, guard: FiniteGuard) -> list[tuple[str, HookFn]]:
        self.total, self.count = self.total.to(batch.tokens.device), self.count.to(batch.tokens.device)

        def hook(logits: Tensor, hook: Any) -> None:
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -lp.gather(-1, batch.tokens[:, 1:, None])[..., 0]
            w = (batch.valid[:, 1:]).to(nll.dtype)  # a target is real when its position is
            guard.watch(hook.name, (nll * w).sum())
            self.total += (nll * w).sum().double()
            self.count += w.sum().double()

        return [("unembed.hook_out", hook)]

    def end_batch(self, batch: TokenBatch) -> None:
        pass

    def result(self, meta: dict[str, Any]) -> float:
        return float(self.total / self.count.clamp_min(1))


def next_token_loss(model: ModelLike, prompts: Any, *, interventions: Sequence[Intervention] = (), batch_size: int = 8, **kw: Any) -> float:
    """Mean next-token loss over the prompts' real tokens (optionally under interventions)."""
    (loss,) = run_stages(model, prompts, [LossAccumulator], batch_size=batch_size, interventions=interventions, **kw)
    return loss


def attention_to(
    model: ModelLike,
    prompts: Any,
    pos: int,
    *,
    interventions: Sequence[Intervention] = (),
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    **kw: Any,
) -> tuple[Tensor, Tensor]:
    """Per layer: mean attention key ``pos`` receives from the queries after it, and its sink rate.

    Returns:
        ``(received [layer], sink_rate [layer])``, over the prompts longer than ``pos + 1``.
    """
    (s,) = run_stages(
        model, prompts, [lambda m, i: SinkAccumulator(m, i, eps=eps, exclude_self=True)],
        batch_size=batch_size, interventions=interventions, **kw,
    )
    return _received_at(s, pos)


@dataclass(frozen=True, kw_only=True, repr=False)
class ChainTrace(SavableResult):
    """The causal chain, link by link (``save(path)`` / ``ChainTrace.load(path)`` like every result).

    Attributes:
        links: One row per measured link: ``link``, ``metric``, ``baseline``, ``intervened``,
            ``effect`` (intervened - baseline) and ``relative`` (effect / |baseline|).
        sweep: One row per (intervention, lambda, layer): attention received by ``pos`` from
            later queries (``received``) and the sink rate at ``pos`` (``sink_rate``), with the
            no-intervention ``baseline_received``.
        pos: The position of the sink-creating interventions.
        neurons: The super neurons ablated, ``[(layer, neuron), ...]``; ``meta["ablation_selection"]``
            says how they were chosen (``"chain"``, ``"first_token"``, ``"given"`` or ``"none"``).
        meta: Provenance.
    """

    links: pd.DataFrame
    sweep: pd.DataFrame
    pos: int
    neurons: list[tuple[int, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The links table."""
        return self.links.copy()

    def __repr__(self) -> str:
        ablated = ", ".join(f"L{layer}N{n}" for layer, n in self.neurons) or "none"
        lines = [f"ChainTrace(pos={self.pos}, ablated={ablated}, {len(self.links)} links, {len(self.sweep)} sweep rows)"]
        for r in self.links.itertuples():
            lines.append(f"  {r.link}: {r.metric} {r.baseline:.4g} -> {r.intervened:.4g}")
        return "\n".join(lines)

    def peak_received(self) -> pd.DataFrame:
        """Per (intervention, lambda): the largest per-layer attention received by ``pos``."""
        g = self.sweep.groupby(["intervention", "lam"], sort=False, dropna=False)
        return g.agg(peak_received=("received", "max"), peak_layer=("received", "idxmax"),
                     peak_sink_rate=("sink_rate", "max")).reset_index().assign(
            peak_layer=lambda d: self.sweep.loc[d["peak_layer"], "layer"].values
        )

    def report(self) -> str:
        lines = [f"causal-chain trace of {self.meta.get('model_name')} ({self.meta.get('n_prompts')} prompts)"]
        if self.neurons:
            lines.append(f"ablating super neurons {', '.join(f'L{layer}N{n}' for layer, n in self.neurons)} at position 0 (mean; "
                         f"{self.meta.get('ablation_note', 'given')}):")
            for r in self.links.itertuples():
                lines.append(f"  {r.link:<28} {r.metric:<44} {r.baseline:10.4g} -> {r.intervened:10.4g} ({r.relative:+.0%})")
        else:
            lines.append(f"{self.meta.get('ablation_note') or 'no super neurons found'}: the ablation links were not measured")
        lines.append(f"interventions at position {self.pos}: peak attention received over layers")
        for r in self.peak_received().itertuples():
            lam = "" if math.isnan(r.lam) else f" lambda={r.lam:g}"
            lines.append(f"  {r.intervention + lam:<34} {r.peak_received:.3f} (layer {r.peak_layer}), sink rate {r.peak_sink_rate:.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def _repr_html_(self) -> str:
        return (
            f"<b>ChainTrace</b> (position {self.pos})<br>" + self.links.to_html(index=False)
            + self.peak_received().to_html(index=False)
            + f"<details><summary>meta</summary>{meta_html(self.meta)}</details>"
        )


def _default_pos(corpus: PreparedPrompts) -> int:
    shortest = min(len(s) for s in corpus.sequences)
    if shortest < 4:
        raise ValueError("the position interventions need prompts of at least 4 tokens")
    return shortest // 2


def _received_at(s: SinkScores, pos: int) -> tuple[Tensor, Tensor]:
    """Per layer: mean attention ``pos`` receives (over heads) and its sink rate, from ``s``."""
    if pos >= s.values.shape[-1] or int(s.n_prompts[pos]) == 0:
        raise ValueError(f"no prompt has a query after position {pos}; choose a smaller pos or longer prompts")
    return s.values[:, :, pos].mean(1), s.above_eps[:, :, pos].mean(1)


def _check_base(base: Any, corpus: PreparedPrompts, info: ModelInfo, eps: float) -> ScanResult:
    """A given base scan must be an unintervened scan of the same tokens and model, with ``eps``."""
    if not isinstance(base, ScanResult):
        raise TypeError(f"base must be the ScanResult of tl_sinks.scan on the same prompts, got {type(base).__name__}")
    m = base.meta
    problems = []
    if m.get("corpus_sha256") != corpus.fingerprint:
        problems.append("it was computed on other tokens (meta['corpus_sha256'] differs from the prompts')"
                        if m.get("corpus_sha256") else "it records no corpus fingerprint (meta['corpus_sha256'])")
    if m.get("model_name") != info.model_name:
        problems.append(f"it is a scan of {m.get('model_name')!r}, not {info.model_name!r}")
    if m.get("interventions"):
        problems.append("it was made under interventions")
    missing = [name for name in ("sinks", "disparity") if getattr(base, name) is None]
    if missing:
        problems.append(f"it lacks the {' and '.join(missing)} stage(s)")
    elif base.sinks.eps != eps or base.sinks.meta.get("exclude_self"):
        problems.append(f"its sinks stage used eps={base.sinks.eps}, exclude_self={base.sinks.meta.get('exclude_self')} "
                        f"(the trace: eps={eps}, exclude_self=False)")
    if problems:
        raise ValueError("base cannot be the trace's baseline: " + "; ".join(problems))
    return base


def _baseline(
    model: ModelLike, info: ModelInfo, corpus: PreparedPrompts, base: Any, pos: int, eps: float, run: Callable[..., list[Any]]
) -> tuple[ScanResult, tuple[Tensor, Tensor], float | None]:
    """The untouched model in one pass per batch: the base scan (unless given), attention to
    ``pos`` (the sweep's "none" condition) and the next-token loss (causal models)."""
    extra: list[AccumulatorFactory] = [lambda m, i: SinkAccumulator(m, i, eps=eps, exclude_self=True)]
    if info.causal:
        extra.append(LossAccumulator)
    if base is not None:
        base = _check_base(base, corpus, info, eps)
        out = run(extra, label=f"trace: baseline at position {pos}")
    else:
        plan = plan_scan(model, eps=eps)
        res = run([*plan.factories, *extra], label=f"trace: scan, and the baseline at position {pos}")
        base, out = plan.result(res), res[len(plan.factories):]
    return base, _received_at(out[0], pos), (out[1] if info.causal else None)


def _targets(base: ScanResult, neurons: Sequence[tuple[int, int]] | None) -> AblationTargets:
    if neurons is not None:
        return AblationTargets([tuple(n) for n in neurons], "given", "neurons given")  # type: ignore[misc]
    sn = base.super_neurons  # the chain super neurons; first-token ones if none (ablation_targets)
    return sn.ablation_targets() if sn is not None else AblationTargets([], "none", "no super neuron stage")


def _ablation_links(
    model: ModelLike, info: ModelInfo, base: ScanResult, targets: AblationTargets, base_loss: float | None, eps: float,
    run: Callable[..., list[Any]],
) -> pd.DataFrame:
    """Mean-ablate the target neurons at position 0: massive dim, disparity, sink and loss, each
    against the base scan, from one pass per batch."""
    rows: list[dict[str, Any]] = []
    cols = ["link", "metric", "baseline", "intervened", "effect", "relative"]
    neurons = targets.neurons
    if not neurons:
        return pd.DataFrame(rows, columns=cols)
    spec = AblateNeurons(neurons=tuple(neurons), pos=0, mode="mean")  # type: ignore[arg-type]
    plan = plan_scan(model, stages=["sinks", "disparity"], eps=eps)
    factories = [*plan.factories, LossAccumulator] if info.causal else list(plan.factories)
    abl_sinks, abl_disp, *loss = run(factories, interventions=[spec],
                                     label=f"trace: {', '.join(targets.labels)} mean-ablated at position 0")
    d0 = base.disparity
    dim = int(d0.top_dims().sort_values("first_mean_abs").iloc[-1]["dim"])
    layer = int(d0.first_mean_abs[:, dim].argmax())

    def row(link: str, metric: str, b: float, a: float) -> None:
        rows.append({"link": link, "metric": metric, "baseline": b, "intervened": a, "effect": a - b,
                     "relative": (a - b) / abs(b) if b else float("nan")})

    row("super neurons -> massive dim" if targets.selection != "first_token" else "first-token neurons -> massive dim",
        f"mean |x| of dim {dim} at pos 0, layer {layer}",
        float(d0.first_mean_abs[layer, dim]), float(abl_disp.first_mean_abs[layer, dim]))
    # Only layers after the earliest ablated neuron can change: the attention inputs of
    # layers l0+1.. (or, for a neuron in the last layer, the final residual stream).
    l0 = min(n[0] for n in neurons)
    if l0 + 1 < info.n_layers:
        site, span, where = "attn_in", slice(l0 + 1, None), f"layers {l0 + 1}-{info.n_layers - 1}, {info.attn_in_label}"
    else:
        site, span, where = "resid", slice(l0, l0 + 1), f"layer {l0}, residual stream"
    row("-> dimension disparity", f"paper ratio at pos 0 (mean over {where})",
        float(d0.disparity_by_layer(0, site=site).values[span].mean()),
        float(abl_disp.disparity_by_layer(0, site=site).values[span].mean()))
    row("-> sink", f"sink rate at pos 0 (eps={eps})", base.sinks.sink_rate(0), abl_sinks.sink_rate(0))
    row("-> sink", "mean attention received by pos 0", base.sinks.mean_received(0), abl_sinks.mean_received(0))
    if info.causal:
        row("-> loss", "next-token loss", float(base_loss), loss[0])  # type: ignore[arg-type]
    return pd.DataFrame(rows, columns=cols)


def _sweep(
    info: ModelInfo, pos: int, lambdas: Sequence[float | int], eps: float, none: tuple[Tensor, Tensor],
    run: Callable[..., list[Any]],
) -> pd.DataFrame:
    """Attention received by ``pos`` per layer under each sink-creating intervention, one pass per batch each."""
    conditions: list[tuple[str, float, list[Intervention]]] = [("self_only_mask", float("nan"), [SelfOnlyMask(pos=pos)])]
    conditions += [("amplify_deviation", float(lam), [AmplifyDeviation(pos=pos, lam=float(lam))]) for lam in lambdas]
    conditions += [("scale_output", float(lam), [ScaleOutput(pos=pos, lam=float(lam))]) for lam in lambdas]
    measured = [("none", float("nan"), none)]
    for name, lam, specs in conditions:
        label = f"trace: {name}{'' if math.isnan(lam) else f' lambda={lam:g}'} at position {pos}"
        (s,) = run([lambda m, i: SinkAccumulator(m, i, eps=eps, exclude_self=True)], interventions=specs, label=label)
        measured.append((name, lam, _received_at(s, pos)))
    baseline = none[0]
    return pd.DataFrame([
        {"intervention": name, "lam": lam, "layer": layer, "received": float(rec[layer]),
         "sink_rate": float(rate[layer]), "baseline_received": float(baseline[layer])}
        for name, lam, (rec, rate) in measured for layer in range(info.n_layers)
    ])


def trace_chain(
    model: ModelLike,
    prompts: Any = None,
    *,
    base: ScanResult | None = None,
    pos: int | None = None,
    lambdas: Sequence[float | int] = DEFAULT_LAMBDAS,
    neurons: Sequence[tuple[int, int]] | None = None,
    eps: float = DEFAULT_EPS,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = True,
) -> ChainTrace:
    """Trace the causal chain with interventions and report an effect size per link.

    The prompts are prepared once, and every condition is one pass over them: the untouched
    model (the base scan, unless ``base`` is given, together with the loss and the attention
    sweep's baseline), the super neurons ablated (disparity, sinks and loss together), and one
    per sink-creating intervention.

    Args:
        model: A TransformerBridge in eval mode.
        prompts: Strings, token ids, a padded tensor, or prompts prepared once with
            :func:`tl_sinks.scan.prepare_corpus` (``None``: the built-in prompts).
        base: The :class:`~tl_sinks.scan.ScanResult` of :func:`tl_sinks.scan` on the same prompts
            (no interventions, the same ``eps``), used as the baseline instead of scanning again;
            checked against the prompts' fingerprint (``meta["corpus_sha256"]``) and the model.
        pos: Position for the sink-creating interventions (default: half the shortest prompt).
        lambdas: Amplification factors for :class:`AmplifyDeviation` and :class:`ScaleOutput`.
        neurons: Super neurons to ablate (default: the chain super neurons the base scan
            finds, else its first-token ones; see :meth:`SuperNeurons.ablation_targets`).
        eps: Sink-rate threshold.
        batch_size, attention_mask, prepend_bos, require_bos: As for :func:`tl_sinks.scan`
            (the last three only for prompts not yet prepared).
        progress: Show progress bars (one per condition, each named).

    Returns:
        :class:`ChainTrace`.

    Raises:
        ValueError: Bad prompts, prompts too short for ``pos``, or a ``base`` that is not a
            scan of these prompts on this model.
    """
    info = inspect_model(model)
    corpus = prepare_corpus(model, builtin_prompts() if prompts is None else prompts, attention_mask=attention_mask,
                            prepend_bos=prepend_bos, require_bos=require_bos, info=info)
    p = _default_pos(corpus) if pos is None else pos
    run = functools.partial(run_stages, model, corpus, batch_size=batch_size, progress=progress)
    base_given = base is not None
    base, none, base_loss = _baseline(model, info, corpus, base, p, eps, run)
    targets = _targets(base, neurons)
    links = _ablation_links(model, info, base, targets, base_loss, eps, run)
    sweep = _sweep(info, p, lambdas, eps, none, run)
    neurons = targets.neurons
    meta = {**base.meta, "pos": p, "lambdas": list(lambdas), "eps": eps, "attn_in_site": info.attn_in_site_description,
            "base_scan": "given" if base_given else "scanned",
            "ablation": "AblateNeurons(mode='mean', pos=0)" if neurons else None, "ablation_selection": targets.selection,
            "ablation_note": targets.note, "ablated": targets.labels}
    return ChainTrace(links=links, sweep=sweep, pos=p, neurons=list(neurons), meta=meta)


__all__: Sequence[str] = ["ChainTrace", "LossAccumulator", "attention_to", "next_token_loss", "trace_chain"]
