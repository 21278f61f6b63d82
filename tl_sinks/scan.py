"""One pass over a corpus that measures every stage of the causal chain.

:func:`scan` runs the sink, value-aggregation, super-neuron and dimension-disparity stages
together: each batch goes through the model once, with every stage's accumulating hooks
attached, so the scan costs about one forward pass per batch and never holds a full activation
cache. It returns a :class:`ScanResult` holding the four stage results and the headline findings
(:meth:`ScanResult.summary`), which also print as a short report.

Example:
    >>> import tl_sinks
    >>> model = tl_sinks.load_model("path/to/hf-model")   # doctest: +SKIP
    >>> result = tl_sinks.scan(model, ["The cat sat on the mat."])  # doctest: +SKIP
    >>> print(result)                                       # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pandas as pd
from torch import Tensor

from tl_sinks._compat import inspect_model
from tl_sinks._driver import AccumulatorFactory, build, execute, prepare_corpus
from tl_sinks._types import ModelLike
from tl_sinks.aggregation import AggregationAccumulator, ValueAggregation
from tl_sinks.disparity import (
    DEFAULT_ABS_THRESHOLD,
    DEFAULT_REL_THRESHOLD,
    DimensionDisparity,
    DisparityAccumulator,
)
from tl_sinks.interventions import Intervention, check_pattern_readers, intervention_hooks
from tl_sinks.results import SavableResult, _clip, meta_html
from tl_sinks.sinks import DEFAULT_EPS, SinkAccumulator, SinkScores
from tl_sinks.super_neurons import (
    DEFAULT_MIN_LAYER_RATIO,
    DEFAULT_MIN_RATIO,
    SuperNeuronAccumulator,
    SuperNeurons,
)

STAGES = ("sinks", "aggregation", "super_neurons", "disparity")


def builtin_prompts() -> list[str]:
    """The short English prompts shipped with tl_sinks (one per line of ``data/prompts.txt``)."""
    text = resources.files("tl_sinks").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def run_stages(
    model: ModelLike,
    prompts: Any,
    factories: Sequence[AccumulatorFactory],
    *,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = False,
    interventions: Any = (),
    cache: Any = None,
    label: str | None = None,
) -> list[Any]:
    """Validate prompts, build the accumulators, run the corpus once, return their results.

    :func:`tl_sinks._driver.run_stages` with interventions: ``interventions``
    (:mod:`tl_sinks.interventions` specs, or one spec) are applied in every forward pass, before
    the accumulators read the activations; their hooks get each batch's padding mask. Under a
    spec that edits the attention pattern, ``meta["pattern_edits"]`` records how the pattern
    stages read saw it, and a model whose readout self-check failed raises instead (see
    :func:`tl_sinks.interventions.check_pattern_readers`).

    ``prompts`` may be prepared already (:func:`prepare_corpus`); they are then used as they are.
    With ``cache`` (an ``ActivationCache`` or a mapping of hook names to tensors) no forward
    pass runs: the accumulators' hooks are fed the cached tensors (:func:`tl_sinks.hooks.run_cached`),
    so the numbers are those of a forward pass on the same batch. ``prompts`` must then be the
    tokens the cache was computed on (they are validated as usual: BOS, padding); a padded
    token tensor must be right-padded. ``label`` names the run in the progress bar.
    """
    info = inspect_model(model)
    prepared = prepare_corpus(model, prompts, attention_mask=attention_mask, prepend_bos=prepend_bos,
                              require_bos=require_bos, info=info, for_cache=cache is not None)
    accs = build(model, info, factories)
    specs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if cache is not None and specs:
        raise ValueError("interventions cannot be applied to a precomputed cache; run the model under "
                         "intervene(...) when you make the cache, or pass prompts without cache=")
    meta: dict[str, Any] = {}
    extra: Any = ()
    if specs:
        intervention_hooks(model, specs, None, info)  # validate specs before the first batch
        reads_pattern = any(n.endswith("attn.hook_pattern") for a in accs for n in a.hook_names())
        pattern_edits = check_pattern_readers(model, info, specs, reads_pattern=reads_pattern)
        meta["interventions"] = [s.to_dict() for s in specs]
        if pattern_edits is not None:
            meta["pattern_edits"] = pattern_edits  # how hook_pattern readers saw the edit (applied or mirrored)
        extra = lambda batch: intervention_hooks(model, specs, batch.valid, info)  # noqa: E731

    return execute(model, info, prepared, accs, batch_size=batch_size, progress=progress, extra_hooks=extra,
                   cache=cache, attention_mask=attention_mask, meta=meta, label=label)


@dataclass(frozen=True, kw_only=True)
class ScanResult(SavableResult):
    """All four stages of one scan, and the headline findings.

    Attributes:
        sinks: :class:`~tl_sinks.sinks.SinkScores` (or ``None`` if not run).
        aggregation: :class:`~tl_sinks.aggregation.ValueAggregation`.
        super_neurons: :class:`~tl_sinks.super_neurons.SuperNeurons`.
        disparity: :class:`~tl_sinks.disparity.DimensionDisparity`.
        skipped: Stages not run, with the reason.
        meta: Provenance (model, inputs, settings).
    """

    sinks: SinkScores | None = None
    aggregation: ValueAggregation | None = None
    super_neurons: SuperNeurons | None = None
    disparity: DimensionDisparity | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Headline numbers of each stage that ran, as a flat dict."""
        out: dict[str, Any] = {
            "model": self.meta.get("model_name"),
            "attention": self.meta.get("attention"),
            "n_prompts": self.meta.get("n_prompts"),
            "n_tokens": self.meta.get("n_tokens"),
        }
        if self.sinks is not None:
            s = self.sinks
            out["sink_rate_pos0"] = s.sink_rate(0)
            out["mean_received_pos0"] = s.mean_received(0)
            out["uniform_pos0"] = float(s.uniform[0])
            out["ratio_to_uniform_pos0"] = s.ratio_to_uniform(0)
            out["n_sink_heads_pos0"] = len(s.heads(0))
            sec = s.detect_sinks()
            out["secondary_sinks"] = [
                (r.str_token if r.kind == "token" else f"pos {r.key_pos}", round(r.sink_rate, 3))
                for r in sec.head(5).itertuples()
            ]
        if self.aggregation is not None:
            r = self.aggregation.first_rest_ratio().values
            out["var_ratio_first_rest_median"] = float(r.median())
            out["share_heads_var_first_gt_rest"] = float((r > 1).float().mean())
        if self.super_neurons is not None:
            f = self.super_neurons.found
            out["n_super_neurons"] = len(f)
            if len(f):
                top = f.iloc[0]
                out["top_super_neuron"] = top["label"]
                out["top_super_neuron_peak"] = float(top["max_value"])
                out["top_super_neuron_pos"] = int(top["max_pos"])
                out["top_super_neuron_ratio"] = float(top["position_ratio"])
                out["top_super_neuron_kurtosis"] = float(top["down_kurtosis"])
                out["top_super_neuron_dims"] = list(top["top_dims"])
        if self.disparity is not None:
            d = self.disparity
            td = d.top_dims()
            best = td.loc[td["first_mean_abs"].idxmax()]
            out["massive_dim_pos0"] = int(best["dim"])
            out["massive_dim_layer"] = int(best["layer"])
            out["massive_dim_value"] = float(best["first_mean_abs"])
            out["massive_dim_ratio_to_median"] = float(best["ratio_to_median"])
            out["disparity_pos0_attn_in"] = d.disparity(0)
            out["disparity_pos0_resid"] = d.disparity(0, site="resid")
            out["disparity_rest_attn_in"] = d.disparity("rest")
            md = d.massive_dims()
            first = md[md["pos_class"] == "first"] if not md.empty else md
            out["sun_massive_dims_pos0"] = [
                (int(r.dim), int(r.first_layer), int(r.last_layer), r.writer) for r in first.itertuples()
            ]
            if self.super_neurons is not None and len(self.super_neurons.found):
                out["super_neuron_writes_massive_dim"] = int(best["dim"]) in list(self.super_neurons.found.iloc[0]["top_dims"])
        return out

    def to_frame(self) -> pd.DataFrame:
        """The summary as a two-column DataFrame (``finding``, ``value``)."""
        return pd.DataFrame({"finding": list(self.summary()), "value": [str(v) for v in self.summary().values()]})

    def report(self) -> str:
        """A short plain-text report of the findings."""
        lines = [f"tl_sinks scan of {self.meta.get('model_name')} "
                 f"({self.meta.get('attention')} attention, {self.meta.get('norm_placement')}; "
                 f"{self.meta.get('n_prompts')} prompts, {self.meta.get('n_tokens')} tokens)"]
        for name in STAGES:
            res = getattr(self, name)
            if res is not None:
                lines.append(f"[{name}]")
                # The header already names the attention type; the stages' own summaries repeat it.
                lines += [f"  {s}" for s in res._summary_lines() if not s.startswith("attention: ")]
            elif name in self.skipped:
                lines.append(f"[{name}] skipped: {self.skipped[name]}")
        if self.sinks is not None:
            sec = self.sinks.detect_sinks()
            if len(sec):
                lines.append("  other sinks: " + ", ".join(
                    f"{r.str_token!r} (rate {r.sink_rate:.2f}, n={r.count})" if r.kind == "token"
                    else f"position {r.key_pos} (rate {r.sink_rate:.2f})" for r in sec.head(5).itertuples()
                ))
        if self.disparity is not None:
            md = self.disparity.massive_dims()
            for r in md.head(6).itertuples():
                lines.append(
                    f"  Sun-massive dim {r.dim} at the {r.pos_class} token(s), layers {r.first_layer}-{r.last_layer}, "
                    f"max mean |x| {r.max_mean_abs:.1f}" + (f", written by {r.writer}" if r.writer else "")
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def __repr__(self) -> str:
        """Compact: each stage's class and dims, and the headline numbers (``print(result)`` for the report)."""
        m = self.meta
        lines = [f"ScanResult of {m.get('model_name')} ({m.get('attention')} attention; "
                 f"{m.get('n_prompts')} prompts, {m.get('n_tokens')} tokens)"]
        for name in STAGES:
            res = getattr(self, name)
            if res is not None:
                lines.append(f"  {name}: {repr(res).splitlines()[0]}")
            elif name in self.skipped:
                lines.append(f"  {name}: skipped ({_clip(self.skipped[name], 120)})")
        try:
            summary = self.summary()
        except Exception as e:  # a repr must not raise
            summary = {"summary": f"unavailable ({type(e).__name__})"}
        keys = ("sink_rate_pos0", "ratio_to_uniform_pos0", "var_ratio_first_rest_median", "n_super_neurons",
                "top_super_neuron", "massive_dim_pos0", "massive_dim_layer", "disparity_pos0_attn_in", "summary")
        shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items() if k in keys]
        if shown:
            lines.append("  " + _clip(", ".join(shown), 400))
        lines.append("  print(result) for the report, result.summary() for every headline number")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        body = "<br>".join(html.escape(s) for s in self.report().splitlines())
        return f"<div><b>ScanResult</b><br>{body}<details><summary>meta</summary>{meta_html(self.meta)}</details></div>"


def scan(
    model: ModelLike,
    prompts: Any = None,
    *,
    stages: Sequence[str] | None = None,
    eps: float = DEFAULT_EPS,
    exclude_self: bool = False,
    min_ratio: float = DEFAULT_MIN_RATIO,
    min_layer_ratio: float = DEFAULT_MIN_LAYER_RATIO,
    abs_threshold: float = DEFAULT_ABS_THRESHOLD,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = True,
    interventions: Any = (),
    cache: Any = None,
) -> ScanResult:
    """Scan a corpus for every stage of the attention-sink causal chain.

    Args:
        model: A TransformerBridge in eval mode (see :func:`tl_sinks.load_model`).
        prompts: Strings, a ``[batch, pos]`` token tensor, or token-id lists. ``None`` uses
            :func:`builtin_prompts`.
        stages: Stages to run, from ``("sinks", "aggregation", "super_neurons", "disparity")``.
            ``None`` runs all that apply: super neurons are skipped (and the reason recorded)
            for attention-only models. Naming a stage that cannot run raises.
        eps: Sink-rate threshold (Gu et al.: 0.3).
        exclude_self: Drop a key's attention to itself from the sink statistics.
        min_ratio: Position ratio that makes a neuron super (see :func:`find_super_neurons`).
        min_layer_ratio: Peak over the layer's median peak that a super neuron also needs.
        abs_threshold: Sun et al. absolute threshold for a massive activation.
        rel_threshold: Sun et al. threshold relative to the token's median ``|x|``.
        batch_size: Prompts per forward pass.
        attention_mask: For a padded token tensor: 1 for real tokens.
        prepend_bos: For strings, whether to prepend BOS. ``None``: as the checkpoint's own
            tokenizer does (not TransformerLens' ``default_prepend_bos``).
        require_bos: Raise unless every prompt starts with BOS ([CLS] for BERT). ``None``: only
            if the checkpoint's tokenizer adds one; if it adds none (Pythia's and Qwen's
            do not), position 0 is analysed as it is (the causal mask makes it the first position, where
            the sink forms). ``meta["first_token"]`` records what was done and why.
        progress: Show a progress bar (it disappears when the scan ends).
        interventions: :mod:`tl_sinks.interventions` specs (or one spec) applied in every
            forward pass (the scan then measures the intervened model).
        cache: An ``ActivationCache`` (or a mapping of hook names to tensors) already computed
            on ``prompts``, which must then be those tokens: the stages read it instead of
            running the model (same numbers). It must hold every hook the chosen stages read.

    Returns:
        :class:`ScanResult`.

    Raises:
        ValueError: Unknown stage names, bad prompts (no BOS where one is required, unmasked
            padding, too long, empty), a model in training mode.
        UnsupportedModelError: A requested stage the model cannot support.
        NonFiniteActivationError: NaN/inf activations.
    """
    plan = plan_scan(model, stages=stages, eps=eps, exclude_self=exclude_self, min_ratio=min_ratio,
                     min_layer_ratio=min_layer_ratio, abs_threshold=abs_threshold, rel_threshold=rel_threshold)
    results = run_stages(
        model,
        builtin_prompts() if prompts is None else prompts,
        plan.factories,
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
        require_bos=require_bos,
        progress=progress,
        interventions=interventions,
        cache=cache,
    )
    return plan.result(results)


@dataclass(frozen=True)
class ScanPlan:
    """What one :func:`scan` runs: the stages, an accumulator factory per stage, and what was skipped.

    A caller that needs more from the same forward passes (``trace_chain``: the loss and the
    attention sweep's baseline) appends its own factories to :attr:`factories` and hands the
    first ``len(stages)`` results to :meth:`result`.
    """

    stages: tuple[str, ...]
    factories: tuple[AccumulatorFactory, ...]
    skipped: dict[str, str]
    post_ln: bool

    def result(self, results: Sequence[Any]) -> ScanResult:
        """The :class:`ScanResult` of the stages' results (in :attr:`stages` order)."""
        by_stage = dict(zip(self.stages, results[: len(self.stages)]))
        meta = dict(results[0].meta)
        meta.pop("stage", None)
        meta["norm_placement"] = "post-LN" if self.post_ln else "pre-LN"
        return ScanResult(**by_stage, skipped=dict(self.skipped), meta=meta)


def plan_scan(
    model: ModelLike,
    *,
    stages: Sequence[str] | None = None,
    eps: float = DEFAULT_EPS,
    exclude_self: bool = False,
    min_ratio: float = DEFAULT_MIN_RATIO,
    min_layer_ratio: float = DEFAULT_MIN_LAYER_RATIO,
    abs_threshold: float = DEFAULT_ABS_THRESHOLD,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
) -> ScanPlan:
    """The :class:`ScanPlan` of :func:`scan` with these settings (arguments as for :func:`scan`).

    Raises:
        ValueError: Unknown or no stage names.
    """
    explicit = stages is not None
    chosen = list(STAGES if stages is None else stages)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    info = inspect_model(model)
    skipped: dict[str, str] = {}
    if "super_neurons" in chosen and not info.has_mlp and not explicit:
        chosen.remove("super_neurons")
        skipped["super_neurons"] = f"{info.architecture} has no MLP layers"
    factories: dict[str, AccumulatorFactory] = {
        "sinks": lambda m, i: SinkAccumulator(m, i, eps=eps, exclude_self=exclude_self),
        "aggregation": AggregationAccumulator,
        "super_neurons": lambda m, i: SuperNeuronAccumulator(m, i, min_ratio=min_ratio, min_layer_ratio=min_layer_ratio),
        "disparity": lambda m, i: DisparityAccumulator(m, i, abs_threshold=abs_threshold, rel_threshold=rel_threshold),
    }
    return ScanPlan(stages=tuple(chosen), factories=tuple(factories[s] for s in chosen), skipped=skipped,
                    post_ln=info.post_ln)


__all__: Sequence[str] = ["STAGES", "ScanPlan", "ScanResult", "builtin_prompts", "plan_scan", "prepare_corpus", "run_stages", "scan"]
