"""Stage 6: batched activation patching over sink sites.

Activation patching runs the model on a *corrupted* input, replaces one activation with its value
from a *clean* run, and measures how much a metric moves. ``transformer_lens.patching`` does one
forward pass per patch. :func:`patch_sweep` puts many patches in one forward pass instead: the
corrupted batch is repeated ``patches_per_forward`` times along the batch axis and copy ``k`` gets
patch ``k``. The numbers are the same (tested against ``transformer_lens.patching``); the sweep
is an order of magnitude faster on small models, where a forward pass is mostly overhead.

Sites (TransformerLens hook names; ``{l}`` is the layer):

==============  =======================================  ====================================
site            hook                                     axes patched one at a time
==============  =======================================  ====================================
resid_pre       ``blocks.{l}.hook_resid_pre``            layer, pos
resid_mid       ``blocks.{l}.hook_resid_mid``            layer, pos
resid_post      ``blocks.{l}.hook_resid_post``           layer, pos
attn_out        ``blocks.{l}.hook_attn_out``             layer, pos
mlp_out         ``blocks.{l}.hook_mlp_out``              layer, pos
z               ``blocks.{l}.attn.hook_z``               layer, pos, head_index
q               ``blocks.{l}.attn.hook_q``               layer, pos, head_index
k, v            ``blocks.{l}.attn.hook_k`` / ``hook_v``  layer, pos, kv_head_index
post            ``blocks.{l}.mlp.hook_post``             layer, pos, neuron
==============  =======================================  ====================================

``all_pos=True`` patches every position at once (the ``pos`` axis disappears). Keys and values
of grouped-query-attention models are patched per *key-value* head (``kv_head_index``), which is
what the model computes; patching "query head ``h``'s key" would silently patch the key shared
by a whole group.

The metric is per prompt: ``metric(logits [batch, pos, d_vocab]) -> [batch]``, never a scalar
``.item()``. With ``metric_site`` the metric reads that hook's activation instead of the logits
(e.g. ``blocks.3.attn.hook_pattern`` to measure attention to the sink).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tl_sinks._compat import inspect_model, model_device, require_hooks
from tl_sinks._progress import tqdm
from tl_sinks._types import ModelLike
from tl_sinks.hooks import hooked
from tl_sinks.results import SinkResult

SITES: dict[str, tuple[str, str | None]] = {
    "resid_pre": ("blocks.{l}.hook_resid_pre", None),
    "resid_mid": ("blocks.{l}.hook_resid_mid", None),
    "resid_post": ("blocks.{l}.hook_resid_post", None),
    "attn_out": ("blocks.{l}.hook_attn_out", None),
    "mlp_out": ("blocks.{l}.hook_mlp_out", None),
    "z": ("blocks.{l}.attn.hook_z", "head_index"),
    "q": ("blocks.{l}.attn.hook_q", "head_index"),
    "k": ("blocks.{l}.attn.hook_k", "kv_head_index"),
    "v": ("blocks.{l}.attn.hook_v", "kv_head_index"),
    "post": ("blocks.{l}.mlp.hook_post", "neuron"),
}

PerPromptMetric = Callable[[Tensor], Tensor]


@dataclass(frozen=True, kw_only=True)
class PatchingResult(SinkResult):
    """Per-prompt metric after each patch.

    Attributes:
        values: ``[*axes, batch]`` metric of each prompt after each patch.
        clean: ``[batch]`` metric on the clean run.
        corrupted: ``[batch]`` metric on the unpatched corrupted run.
        index: The patches, one row each (columns are the axes), in the order of ``values``
            flattened over the axes.
    """

    clean: Tensor
    corrupted: Tensor
    index: pd.DataFrame = field(default_factory=pd.DataFrame)

    def mean(self) -> SinkResult:
        """Mean over prompts."""
        return SinkResult(values=self.values.mean(-1), dims=self.dims[:-1], value_name=self.value_name, meta=self.meta)

    def normalized(self) -> SinkResult:
        """Per prompt ``(patched - corrupted) / (clean - corrupted)``, then averaged: 1 = fully restored."""
        denom = self.clean - self.corrupted
        frac = (self.values - self.corrupted) / torch.where(denom.abs() > 0, denom, torch.full_like(denom, float("nan")))
        return SinkResult(values=frac.nanmean(-1), dims=self.dims[:-1], value_name="normalized", meta=self.meta)


def normalized_metric(metric: PerPromptMetric, clean_value: Tensor, corrupted_value: Tensor) -> PerPromptMetric:
    """Wrap ``metric`` so the clean run scores 1 and the corrupted run 0, per prompt."""

    def wrapped(x: Tensor) -> Tensor:
        return (metric(x) - corrupted_value.to(x.device)) / (clean_value - corrupted_value).to(x.device)

    return wrapped


def logit_diff_metric(correct: Tensor, incorrect: Tensor, pos: int = -1) -> PerPromptMetric:
    """Per prompt: ``logit[correct] - logit[incorrect]`` at position ``pos``."""

    def metric(logits: Tensor) -> Tensor:
        lg = logits[:, pos]
        ar = torch.arange(lg.shape[0], device=lg.device)
        return lg[ar, correct.to(lg.device)] - lg[ar, incorrect.to(lg.device)]

    return metric


def attention_to_metric(pos: int = 0) -> PerPromptMetric:
    """For ``metric_site="blocks.{l}.attn.hook_pattern"``: mean attention to key ``pos`` over heads
    and the queries after it, per prompt."""

    def metric(pattern: Tensor) -> Tensor:
        return pattern[:, :, pos + 1 :, pos].float().mean((1, 2))

    return metric


def _axis_sizes(site: str, n_layers: int, n_pos: int, all_pos: bool, act: Tensor) -> dict[str, int]:
    """The site's patch axes, sized from a hooked activation (``[batch, pos, ...]``), not from
    ``cfg``: configs can disagree with the tensors (OPT's ``d_mlp`` with ``ffn_dim != 4 d_model``)."""
    extra = SITES[site][1]
    sizes = {"layer": n_layers}
    if not all_pos:
        sizes["pos"] = n_pos
    if extra is not None:
        sizes[extra] = int(act.shape[2])
    return sizes


def _get_clean(clean: Any, names: list[str]) -> dict[str, Tensor]:
    """The site's activations from a clean ``ActivationCache`` or mapping."""
    try:
        return {n: clean[n] for n in names}
    except KeyError as e:
        raise ValueError(f"the clean cache lacks {e.args[0]}; cache it, or pass the clean tokens instead") from e


def _prefix_reuse_possible(info: Any, has_pos: bool, mask: Tensor | None, metric_site: str | None) -> tuple[bool, str]:
    if not info.causal:
        return False, "the model is bidirectional: a patch changes every position"
    if not has_pos:
        return False, "the site is patched at every position at once"
    if mask is not None and not bool(mask.bool().all()):
        return False, "the inputs are padded"
    if metric_site is not None:
        return False, "the metric reads a hook activation, not the logits"
    return True, ""


# --------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class Shortcuts:
    """The fast paths a sweep may take. Each one used is checked against plain full passes
    (one patch per forward pass, every block, every position) before its numbers are trusted.

    Attributes:
        prefix_reuse: Start each pass at its first patched position from the corrupted run's
            cached keys and values (causal models).
        layer_skip: Start each pass at its first patched block from the corrupted residual.
        skip_unchanged: Give patches whose clean activation equals the corrupted one bit for bit
            the corrupted metric without a pass.
        batching: Patches per forward pass (copies of the corrupted batch); 1 = none.
    """

    prefix_reuse: bool = False
    layer_skip: bool = False
    skip_unchanged: bool = False
    batching: int = 1

    def used(self) -> list[str]:
        """Names of the shortcuts switched on."""
        on = [n for n in ("prefix_reuse", "layer_skip", "skip_unchanged") if getattr(self, n)]
        return on + (["batching"] if self.batching > 1 else [])

    def without(self, names: Sequence[str]) -> "Shortcuts":
        """These shortcuts with ``names`` switched off."""
        return Shortcuts(
            prefix_reuse=self.prefix_reuse and "prefix_reuse" not in names,
            layer_skip=self.layer_skip and "layer_skip" not in names,
            skip_unchanged=self.skip_unchanged and "skip_unchanged" not in names,
            batching=1 if "batching" in names else self.batching,
        )


@dataclass
class _Sweep:
    """Everything a sweep's passes need, computed once: the patches, the corrupted run (output,
    metric, cached activations), the clean activations and the timings the planner uses."""

    model: ModelLike
    site: str
    all_pos: bool
    rows: Tensor  # [n_patches, n_axes] on the CPU: layer, [pos], [head / neuron]
    n_layers: int
    tokens: Tensor  # [batch, pos] corrupted, on the model's device
    mask: Tensor | None
    metric: PerPromptMetric
    metric_site: str | None
    clean_acts: dict[str, Tensor]
    corrupted_out: Tensor
    corrupted_acts: dict[str, Tensor]
    skipper: "_BlockSkipper | None"
    overhead: float
    per_row: float
    corrupted_value: Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def template(self) -> str:
        return SITES[self.site][0]

    @property
    def extra(self) -> str | None:
        return SITES[self.site][1]

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def metric_layer(self) -> int:
        # Blocks before a pass' first patched layer, and before the metric's hook, are skipped.
        return _layer_of(self.metric_site, self.n_layers)


@dataclass(frozen=True)
class PatchPass:
    """One forward pass: the patches it holds (row ids), the position and block it starts at."""

    rows: Tensor
    start_pos: int
    start_layer: int


@dataclass(frozen=True)
class PatchPlan:
    """The passes of a sweep, the no-op patches that need none, and the shortcuts behind them."""

    passes: tuple[PatchPass, ...]
    unchanged: Tensor  # [n_patches] bool
    shortcuts: Shortcuts


# --------------------------------------------------------------------------- plan
def make_plan(sweep: _Sweep, shortcuts: Shortcuts, row_ids: Tensor | None = None) -> PatchPlan:
    """Group the patches (all, or ``row_ids``) into forward passes using ``shortcuts``."""
    n = len(sweep.rows)
    subset = torch.arange(n) if row_ids is None else row_ids
    unchanged = torch.zeros(n, dtype=torch.bool)
    if shortcuts.skip_unchanged:
        flags = _unchanged_rows(sweep.rows, sweep.clean_acts, sweep.corrupted_acts, sweep.template,
                                has_extra=sweep.extra is not None, all_pos=sweep.all_pos)
        unchanged[subset] = flags[subset]
    todo = subset[~unchanged[subset]]
    chunks = _best_plan(
        sweep.rows[todo], shortcuts.batching, by_pos=shortcuts.prefix_reuse, n_pos=sweep.n_pos, n_layers=sweep.n_layers,
        batch=sweep.batch, skip=shortcuts.layer_skip, metric_layer=sweep.metric_layer, overhead=sweep.overhead,
        per_row=sweep.per_row,
    )
    passes = []
    for ids in chunks:
        chunk = sweep.rows[todo[ids]]
        p0 = int(chunk[:, 1].min()) if shortcuts.prefix_reuse else 0
        s0 = min(int(chunk[:, 0].min()), sweep.metric_layer) if shortcuts.layer_skip else 0
        passes.append(PatchPass(rows=todo[ids], start_pos=p0, start_layer=s0))
    return PatchPlan(passes=tuple(passes), unchanged=unchanged, shortcuts=shortcuts)


# --------------------------------------------------------------------------- execute
def _run(sweep: _Sweep, inp: Tensor, hooks: list, K: int, **kwargs: Any) -> Tensor:
    """One forward pass of ``K`` copies with ``hooks``: the logits, or the metric site's activation."""
    seen: dict[str, Tensor] = {}
    if sweep.metric_site is not None:
        hooks = hooks + [(sweep.metric_site, lambda t, hook: seen.__setitem__("x", t))]
    if sweep.mask is not None:
        kwargs["attention_mask"] = sweep.mask.repeat_interleave(K, 0)
    with torch.no_grad(), hooked(sweep.model, hooks), _kv_cache_alias(sweep.model, "past_key_values" in kwargs or "cache" in kwargs):
        out = sweep.model(inp, **kwargs)
    return seen["x"] if sweep.metric_site is not None else out


def _per_copy(sweep: _Sweep, x: Tensor, K: int) -> Tensor:
    """``[K, batch]`` metric of each copy. Copies are interleaved by prompt (row ``b * K + k`` is
    copy ``k`` of prompt ``b``), the layout of Hugging Face's ``batch_repeat_interleave``."""
    out = []
    for k in range(K):
        v = torch.as_tensor(sweep.metric(x[k::K]))
        if v.shape != (sweep.batch,):
            raise ValueError(f"metric must return a [batch] tensor of length {sweep.batch}, got shape {tuple(v.shape)}")
        out.append(v.float())
    return torch.stack(out)


def _patch_hook(sweep: _Sweep, cols: Tensor, copies: Tensor, clean_act: Tensor, K: int, p0: int) -> Any:
    """A hook writing the clean activation of each patch (``cols``: its row) into its copy."""
    ar_b = torch.arange(sweep.batch, device=clean_act.device)
    all_pos, extra = sweep.all_pos, sweep.extra

    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        b = ar_b[None, :] * K + copies[:, None]  # [n, B] rows of the patched copies
        if all_pos:
            if extra is None:
                act[b] = clean_act[ar_b[None, :]].expand(len(copies), -1, *clean_act.shape[1:]).to(act.dtype)
            else:
                h = cols[:, 1][:, None].expand_as(b)
                act[b, :, h] = clean_act[ar_b[None, :], :, h].to(act.dtype)
        else:
            pos = cols[:, 1][:, None].expand_as(b)
            if extra is None:
                act[b, pos - p0] = clean_act[ar_b[None, :], pos].to(act.dtype)
            else:
                h = cols[:, 2][:, None].expand_as(b)
                act[b, pos - p0, h] = clean_act[ar_b[None, :], pos, h].to(act.dtype)
        return act

    return hook


def _pass_hooks(sweep: _Sweep, chunk: Tensor, p0: int) -> list:
    device = sweep.tokens.device
    hooks = []
    for layer in sorted(set(chunk[:, 0].tolist())):
        sel = torch.nonzero(chunk[:, 0] == layer).flatten()
        name = sweep.template.format(l=layer)
        clean_act = sweep.clean_acts[name].to(device)
        hooks.append((name, _patch_hook(sweep, chunk[sel].to(device), sel.to(device), clean_act, len(chunk), p0)))
    return hooks


def _compute_prefix_cache(sweep: _Sweep, p0: int) -> Any:
    """Hugging Face KV cache of the corrupted run's first ``p0`` positions."""
    with torch.no_grad(), _kv_cache_alias(sweep.model, True):
        _, cache = sweep.model(sweep.tokens[:, :p0], return_type="logits_and_cache")
    return cache


def _cache_kwargs(model: ModelLike, cache: Any) -> dict[str, Any]:
    """Hand the KV cache to the model under the name its Hugging Face forward takes:
    transformers >= 5.24 renamed ``past_key_values`` to ``cache``."""
    root = getattr(model, "original_model", None)
    try:
        params = inspect.signature(root.forward).parameters if root is not None else {}
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    if "cache" in params:
        return {"cache": cache, "use_cache": True}
    return {"past_key_values": cache}


@contextmanager
def _kv_cache_alias(model: ModelLike, active: bool) -> Iterator[None]:
    """Make TransformerLens' own attention implementations see the KV cache.

    transformers 5.24 passes the cache to each attention module as ``cache=``; TransformerLens
    4.3's re-implemented attention bridges (Llama, GPT-2, Gemma, ...) read only
    ``past_key_values`` / ``layer_past``, so they neither filled nor used the cache: a pass that
    starts at position ``p`` attended to positions ``>= p`` only. Bridges that delegate to the
    Hugging Face module (GPT-J, OPT, ...) handle ``cache=`` themselves and are left alone.
    """
    if not active:
        yield
        return
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def alias(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "cache" in kwargs and kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [
        blk.attn.register_forward_pre_hook(alias, with_kwargs=True)
        for blk in getattr(model, "blocks", [])
        if isinstance(getattr(blk, "attn", None), AttentionBridge) and type(blk.attn).forward is not AttentionBridge.forward
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def execute(sweep: _Sweep, plan: PatchPlan, *, progress: bool = False) -> tuple[Tensor, int]:
    """Run a plan's passes.

    Returns:
        ``values [n_patches, batch]`` (the corrupted metric for no-op patches, NaN for patches the
        plan does not hold) and the number of block rows skipped.
    """
    values = torch.full((len(sweep.rows), sweep.batch), float("nan"))
    values[plan.unchanged] = sweep.corrupted_value.cpu()
    prefix_caches: dict[int, Any] = {}
    n_skipped = 0
    for ps in tqdm(plan.passes, disable=not progress, desc=f"patching {sweep.site}", unit="forward", leave=False):
        chunk = sweep.rows[ps.rows]
        K, p0, s0 = len(chunk), ps.start_pos, ps.start_layer
        hooks = _pass_hooks(sweep, chunk, p0)
        kwargs: dict[str, Any] = {}
        if p0 > 0:
            if p0 not in prefix_caches:  # keys and values of the unpatched prefix, once per start
                prefix_caches[p0] = _compute_prefix_cache(sweep, p0)
            cache = copy.deepcopy(prefix_caches[p0])  # the forward extends it
            cache.batch_repeat_interleave(K)
            kwargs.update(_cache_kwargs(sweep.model, cache))
        if s0 > 0:
            inp = sweep.corrupted_acts[f"blocks.{s0}.hook_resid_pre"][:, p0:].repeat_interleave(K, 0)
            with sweep.skipper.skip(s0):  # type: ignore[union-attr]
                tail = _run(sweep, inp, hooks, K, start_at_layer=s0, **kwargs)
            n_skipped += s0 * K
        else:
            tail = _run(sweep, sweep.tokens[:, p0:].repeat_interleave(K, 0), hooks, K, **kwargs)
        out = torch.cat([sweep.corrupted_out[:, :p0].repeat_interleave(K, 0), tail], dim=1) if p0 > 0 else tail
        values[ps.rows] = _per_copy(sweep, out, K).cpu()
    return values, n_skipped


# --------------------------------------------------------------------------- verify
_TRUST: "weakref.WeakKeyDictionary[Any, dict[tuple, tuple[frozenset[str], frozenset[str]]]]" = weakref.WeakKeyDictionary()


def clear_self_checks(model: ModelLike | None = None) -> None:
    """Forget which shortcuts passed or failed their self-checks (for ``model``, or for all)."""
    if model is None:
        _TRUST.clear()
    else:
        _TRUST.pop(model, None)


def _param_dtype(model: ModelLike) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.dtype.is_floating_point else torch.float32


def _trust_key(sweep: _Sweep) -> tuple:
    return (sweep.site, sweep.all_pos, sweep.batch, sweep.n_pos, sweep.metric_site, sweep.mask is not None,
            str(_param_dtype(sweep.model)))


def _tolerance(sweep: _Sweep, ref: Tensor) -> float:
    """Float rounding: a relative 1e-4 in fp32 (batched and single passes agree to ~1e-6 here),
    eight machine epsilons in half precision, of the metric's scale."""
    eps = torch.finfo(_param_dtype(sweep.model)).eps
    vals = torch.cat([ref.flatten(), sweep.corrupted_value.flatten().cpu()])
    scale = float(vals[torch.isfinite(vals)].abs().max()) if bool(torch.isfinite(vals).any()) else 1.0
    return max(1e-4, 8 * eps) * max(scale, 1e-3)


def _sample(plan: PatchPlan) -> Tensor:
    """A few computed patches that exercise the plan's shortcuts: the first and last patch of the
    pass that starts latest (prefix reuse) and deepest (layer skip) with the most copies, and the
    first patch of the last pass."""
    if not plan.passes:
        return torch.zeros(0, dtype=torch.long)
    best = max(plan.passes, key=lambda ps: (ps.start_pos > 0, ps.start_layer > 0, len(ps.rows) > 1, ps.start_pos, ps.start_layer))
    ids = [int(best.rows[0]), int(best.rows[-1]), int(plan.passes[-1].rows[0])]
    return torch.tensor(sorted(set(ids)))


def _max_diff(a: Tensor, b: Tensor) -> float:
    d = (a - b).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, torch.zeros_like(d), d)
    return float(d.max()) if d.numel() else 0.0


@dataclass
class SelfCheck:
    """What a sweep's self-check compared and found (``result.meta["self_check"]``).

    ``checked`` and ``failed`` gather every round (a failed round is followed by one without the
    failed shortcuts); ``max_abs_diff``, ``tolerance`` and ``n_sampled`` describe the worst round.
    """

    mode: str
    checked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    tolerance: float | None = None
    n_sampled: int = 0
    n_forwards: int = 0
    cached: bool = False
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def add_round(self, checked: list[str], failed: list[str], diff: float, tol: float, n_sampled: int) -> None:
        self.rounds.append({"checked": checked, "failed": failed, "max_abs_diff": diff, "tolerance": tol, "n_sampled": n_sampled})
        self.checked = sorted(set(self.checked) | set(checked))
        self.failed = sorted(set(self.failed) | set(failed))
        if self.max_abs_diff is None or diff / tol > self.max_abs_diff / (self.tolerance or 1.0):
            self.max_abs_diff, self.tolerance, self.n_sampled = diff, tol, n_sampled

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _diagnose(sweep: _Sweep, sample: Tensor, ref: Tensor, shortcuts: Shortcuts, tol: float, check: SelfCheck) -> list[str]:
    """Which computing shortcuts, each alone, give other numbers than plain passes."""
    failed = []
    for name in [n for n in shortcuts.used() if n != "skip_unchanged"]:
        only = Shortcuts(prefix_reuse=name == "prefix_reuse", layer_skip=name == "layer_skip",
                         batching=shortcuts.batching if name == "batching" else 1)
        plan = make_plan(sweep, only, sample)
        vals, _ = execute(sweep, plan)
        check.n_forwards += len(plan.passes)
        if _max_diff(vals[sample], ref) > tol:
            failed.append(name)
    # Each alone is right but together they are not: trust none of them.
    return failed or [n for n in shortcuts.used() if n != "skip_unchanged"]


def verify(sweep: _Sweep, plan: PatchPlan, values: Tensor, check: SelfCheck) -> list[str]:
    """Compare a sample of the plan's patches, computed and skipped, with plain full passes (one
    patch per pass, every block and position); return the shortcuts that failed. Fills ``check``."""
    computed = _sample(plan)
    skipped = torch.nonzero(plan.unchanged).flatten()
    noop = skipped[torch.linspace(0, len(skipped) - 1, min(2, len(skipped))).long()] if len(skipped) else skipped
    sample = torch.cat([computed, noop])
    ref_plan = make_plan(sweep, Shortcuts(), sample)
    ref, _ = execute(sweep, ref_plan)
    check.n_forwards += len(ref_plan.passes)
    tol = _tolerance(sweep, ref[sample])
    d_computed, d_noop = _max_diff(values[computed], ref[computed]), _max_diff(values[noop], ref[noop])
    failed = []
    if d_computed > tol:
        failed += _diagnose(sweep, computed, ref[computed], plan.shortcuts, tol, check)
    if d_noop > tol:
        failed.append("skip_unchanged")
    check.add_round(plan.shortcuts.used(), failed, max(d_computed, d_noop), tol, len(sample))
    return failed


def _warn_failed(sweep: _Sweep, failed: Sequence[str], check: SelfCheck, *, earlier: bool) -> None:
    how = ("failed its self-check earlier in this process" if earlier else
           f"failed its self-check (max |diff| {check.max_abs_diff:.3g} > tolerance {check.tolerance:.3g} "
           f"over {check.n_sampled} sampled patches against plain full forward passes)")
    warnings.warn(
        f"patch_sweep: the {' and '.join(failed)} shortcut{'s' if len(failed) > 1 else ''} {how} on "
        f"{getattr(sweep.model.cfg, 'model_name', 'this model')} (site {sweep.site!r}); the sweep was computed "
        f"without {'them' if len(failed) > 1 else 'it'}. See result.meta['self_check'].",
        RuntimeWarning,
        stacklevel=3,
    )


def run_checked(sweep: _Sweep, wanted: Shortcuts, *, self_check: str = "once", progress: bool = False) -> tuple[Tensor, PatchPlan, int, SelfCheck]:
    """Plan, execute and verify; on a failed check, warn and recompute without the failed shortcuts.

    With ``self_check="once"`` a shortcut set that passed on this model, site and input shape is
    trusted without re-checking; ``"always"`` checks every sweep.
    """
    if self_check not in ("once", "always"):
        raise ValueError(f"self_check must be 'once' or 'always', got {self_check!r}")
    check = SelfCheck(mode=self_check)
    key = _trust_key(sweep)
    trusted, known_bad = _TRUST.setdefault(sweep.model, {}).get(key, (frozenset(), frozenset()))
    shortcuts = wanted.without(sorted(known_bad))
    if known_bad & set(wanted.used()):
        check.failed = sorted(known_bad & set(wanted.used()))
        _warn_failed(sweep, check.failed, check, earlier=True)
    while True:
        plan = make_plan(sweep, shortcuts)
        values, n_skipped = execute(sweep, plan, progress=progress)
        used = frozenset(shortcuts.used())
        if not used or (self_check == "once" and used <= trusted):
            check.cached = bool(used)
            check.checked = sorted(set(check.checked) | used)
            return values, plan, n_skipped, check
        failed = verify(sweep, plan, values, check)
        if not failed:
            _TRUST[sweep.model][key] = (trusted | used, known_bad)
            return values, plan, n_skipped, check
        known_bad = known_bad | frozenset(failed)
        _TRUST[sweep.model][key] = (trusted, known_bad)
        _warn_failed(sweep, failed, check, earlier=False)
        shortcuts = shortcuts.without(failed)


# --------------------------------------------------------------------------- the sweep
def _build_index(index: pd.DataFrame | None, sizes: dict[str, int], site: str) -> tuple[pd.DataFrame, tuple[int, ...] | None]:
    axes = list(sizes)
    if index is None:
        return pd.DataFrame(list(itertools.product(*[range(n) for n in sizes.values()])), columns=axes), tuple(sizes.values())
    missing = [a for a in axes if a not in index.columns]
    if missing:
        raise ValueError(f"index lacks column(s) {missing} for site {site!r}")
    index = index[axes].reset_index(drop=True)
    for a in axes:
        if len(index) and not (0 <= index[a].min() and index[a].max() < sizes[a]):
            raise ValueError(f"index column {a!r} out of range [0, {sizes[a]})")
    return index, None


def _check_inputs(model: ModelLike, corrupted_tokens: Tensor, clean: Any, site: str, metric_site: str | None) -> Any:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {sorted(SITES)}")
    info = inspect_model(model)
    if not isinstance(corrupted_tokens, Tensor) or corrupted_tokens.ndim != 2:
        raise ValueError(f"corrupted_tokens must be a [batch, pos] tensor, got {getattr(corrupted_tokens, 'shape', type(corrupted_tokens).__name__)}")
    if isinstance(clean, Tensor) and clean.shape != corrupted_tokens.shape:
        raise ValueError(f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted_tokens.shape)} differ in shape")
    if site == "post" and not info.has_mlp:
        raise ValueError(f"{info.architecture} has no MLP neurons to patch")
    names = [SITES[site][0].format(l=layer) for layer in range(info.n_layers)]
    require_hooks(model, names + ([metric_site] if metric_site else []), stage="patching")
    return info


def _site_width(model: ModelLike, template: str, tokens: Tensor) -> Tensor:
    """Layer 0's site activation on one token: its trailing axes size the patch index."""
    seen: dict[str, Tensor] = {}
    with torch.no_grad(), hooked(model, [(template.format(l=0), lambda t, hook: seen.__setitem__("x", t))]):
        model(tokens[:1, :1], return_type=None)
    return seen["x"]


def _prepare(
    model: ModelLike, corrupted_tokens: Tensor, clean: Any, metric: PerPromptMetric, *, site: str, all_pos: bool,
    index: pd.DataFrame | None, metric_site: str | None, attention_mask: Tensor | None, skipper: "_BlockSkipper | None",
    cache_site: bool,
) -> tuple[_Sweep, pd.DataFrame, tuple[int, ...] | None, Tensor]:
    """The patch index, the corrupted and clean runs, and the timings for the planner."""
    info = _check_inputs(model, corrupted_tokens, clean, site, metric_site)
    device = model_device(model)
    n_layers, template = info.n_layers, SITES[site][0]
    tokens = corrupted_tokens.to(device)
    sizes = _axis_sizes(site, n_layers, int(tokens.shape[1]), all_pos, _site_width(model, template, tokens))
    index, shape = _build_index(index, sizes, site)
    used = [template.format(l=layer) for layer in sorted(set(index["layer"].tolist()))]
    sweep = _Sweep(
        model=model, site=site, all_pos=all_pos, rows=torch.tensor(index.to_numpy(copy=True), dtype=torch.long).reshape(len(index), len(sizes)),
        n_layers=n_layers, tokens=tokens, mask=None if attention_mask is None else attention_mask.to(device),
        metric=metric, metric_site=metric_site, clean_acts={}, corrupted_out=torch.empty(0), corrupted_acts={},
        skipper=skipper, overhead=forward_overhead(model), per_row=0.0,
    )
    # The corrupted run: its output, the residual entering every block (for skipping) and the
    # site's activations (to find no-op patches).
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in range(1, n_layers)] if skipper is not None else []
    t0 = time.perf_counter()
    sweep.corrupted_out, sweep.corrupted_acts = _run_and_cache(sweep, tokens, list(dict.fromkeys(resid + (used if cache_site else []))))
    sweep.per_row = max(time.perf_counter() - t0 - sweep.overhead, 0.0) / (sweep.batch * sweep.n_pos * n_layers)
    sweep.corrupted_value = _per_copy(sweep, sweep.corrupted_out, 1)[0]
    if isinstance(clean, Tensor):  # one pass gives the clean activations and the clean metric
        clean_out, sweep.clean_acts = _run_and_cache(sweep, clean.to(device), used)
        clean_value = _per_copy(sweep, clean_out, 1)[0]
    else:
        sweep.clean_acts = _get_clean(clean, used)
        clean_value = torch.full((sweep.batch,), float("nan"))
    return sweep, index, shape, clean_value


def patch_sweep(
    model: ModelLike,
    corrupted_tokens: Tensor,
    clean: Any,
    metric: PerPromptMetric,
    *,
    site: str,
    all_pos: bool = False,
    index: pd.DataFrame | None = None,
    patches_per_forward: int | None = None,
    metric_site: str | None = None,
    attention_mask: Tensor | None = None,
    progress: bool = True,
    reuse_prefix: bool | None = None,
    skip_layers: bool | None = None,
    skip_unchanged: bool = True,
    self_check: str = "once",
) -> PatchingResult:
    """Patch clean activations into a corrupted run, many patches per forward pass.

    Every shortcut taken (batching, prefix reuse, layer skipping, no-op skipping) proves itself:
    a sample of its patches is recomputed with plain full forward passes, one patch each, and a
    shortcut that disagrees beyond float rounding is dropped with a ``RuntimeWarning`` naming it,
    and the sweep recomputed without it (``result.meta["self_check"]``).

    Args:
        model: A TransformerBridge in eval mode.
        corrupted_tokens: ``[batch, pos]`` corrupted input.
        clean: The clean ``[batch, pos]`` tokens (cached here with a ``names_filter``), or an
            ``ActivationCache`` / mapping holding the site's hooks.
        metric: ``f(logits [batch, pos, d_vocab]) -> [batch]`` (or of ``metric_site``'s activation).
        site: One of :data:`SITES`.
        all_pos: Patch every position at once instead of one position at a time.
        index: Optional DataFrame of patches (columns = the site's axes, e.g. ``layer``, ``pos``,
            ``head_index``); default: every combination.
        patches_per_forward: Patches per forward pass (default: as many as fit in 64 prompts).
        metric_site: Hook whose activation the metric reads instead of the logits.
        attention_mask: Padding mask shared by the clean and corrupted inputs.
        progress: Show a progress bar over the forward passes (default, as in :func:`tl_sinks.scan`;
            it disappears when the sweep ends).
        reuse_prefix: Under a causal mask a patch at position ``p`` leaves positions ``< p``
            as in the corrupted run, so each forward pass can start at its first patched
            position from the corrupted run's cached keys and values (about half the compute
            of a position sweep). ``None`` (default) does so when possible: a causal model,
            no padding mask, a logits metric and a per-position site; ``False`` always runs
            full forward passes.
        skip_layers: Blocks before a patch's layer compute what the corrupted run computed, so a
            forward pass can start at the first patched block from the corrupted residual
            (``start_at_layer``), with the earlier blocks swapped for identities meanwhile (and
            put back on exit). ``None`` (default) does so when the model's block list is found
            and a skipped pass reproduces a full one; ``False`` never does.
        skip_unchanged: A patch whose clean activation equals the corrupted run's bit for bit in
            every prompt (e.g. every position before the first changed token, under a causal
            mask) changes nothing: it gets the corrupted run's metric without a forward pass.
            ``False`` runs it anyway.
        self_check: ``"once"`` (default) checks a set of shortcuts the first time it is used on
            a model, site and input shape in this process; ``"always"`` checks every sweep.

    Returns:
        :class:`PatchingResult` with ``values [*axes, batch]``.

    Raises:
        ValueError: Unknown site, clean/corrupted shape mismatch, a metric that does not return
            ``[batch]``, or a patch index out of range.
    """
    skipper = _BlockSkipper.for_model(model) if skip_layers is not False else None
    if skip_layers and skipper is None:
        raise ValueError("skip_layers=True is not possible here: the model's block list was not found or its blocks do not return a plain tensor")
    sweep, index, shape, clean_value = _prepare(
        model, corrupted_tokens, clean, metric, site=site, all_pos=all_pos, index=index, metric_site=metric_site,
        attention_mask=attention_mask, skipper=skipper, cache_site=skip_unchanged,
    )
    prefix_ok, why_not = _prefix_reuse_possible(inspect_model(model), not all_pos, sweep.mask, metric_site)
    if reuse_prefix and not prefix_ok:
        raise ValueError(f"reuse_prefix=True is not possible here: {why_not}")
    wanted = Shortcuts(
        prefix_reuse=prefix_ok if reuse_prefix is None else bool(reuse_prefix),
        layer_skip=skipper is not None,
        skip_unchanged=bool(skip_unchanged),
        batching=max(1, patches_per_forward or max(1, 64 // sweep.batch)),
    )
    values, plan, n_skipped, check = run_checked(sweep, wanted, self_check=self_check, progress=progress)
    B = sweep.batch
    return PatchingResult(
        values=values.reshape(*shape, B) if shape is not None else values,
        dims=tuple(index.columns) + ("batch",) if shape is not None else ("patch", "batch"),
        value_name="metric",
        clean=clean_value.cpu(),
        corrupted=sweep.corrupted_value.cpu(),
        index=index,
        meta={"site": site, "hook": sweep.template, "all_pos": all_pos, "metric_site": metric_site,
              "patches_per_forward": plan.shortcuts.batching, "n_patches": len(sweep.rows),
              "model_name": getattr(model.cfg, "model_name", ""),
              "prefix_reuse": plan.shortcuts.prefix_reuse, "prefix_reuse_unavailable": None if prefix_ok else why_not,
              "layer_skip": plan.shortcuts.layer_skip, "n_forwards": len(plan.passes),
              "block_rows_skipped": n_skipped, "n_unchanged_skipped": int(plan.unchanged.sum()),
              "self_check": check.to_dict()},
    )


# --------------------------------------------------------------------------- speed-ups
_SKIPPERS: "weakref.WeakKeyDictionary[Any, _BlockSkipper | None]" = weakref.WeakKeyDictionary()


class _Identity(torch.nn.Module):
    """Stands in for a skipped block: returns its input hidden states."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class _BlockSkipper:
    """Swaps the first blocks of a model's block list for identities, and back.

    The Hugging Face model runs its blocks from one ``ModuleList`` (TransformerLens' block
    bridges sit in it). While blocks ``< s`` are identities, ``start_at_layer=s`` makes block
    ``s`` replace its input with the given residual, so nothing before it is computed.
    """

    def __init__(self, layer_list: torch.nn.ModuleList) -> None:
        self.layers = layer_list

    @classmethod
    def for_model(cls, model: ModelLike) -> "_BlockSkipper | None":
        if model not in _SKIPPERS:
            _SKIPPERS[model] = cls._find(model)
        return _SKIPPERS[model]

    @classmethod
    def _find(cls, model: ModelLike) -> "_BlockSkipper | None":
        blocks = list(getattr(model, "blocks", []))
        root = getattr(model, "original_model", None)
        if not blocks or not isinstance(root, torch.nn.Module) or not hasattr(model, "_setup_start_at_layer"):
            return None
        for mod in root.modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) == len(blocks) and all(a is b for a, b in zip(mod, blocks)):
                skipper = cls(mod)
                return skipper if _blocks_return_tensors(model, blocks[0]) and skipper._reproduces(model) else None
        return None

    def _reproduces(self, model: ModelLike) -> bool:
        """Self-check: a pass that skips to a middle block gives the full pass' logits. Some
        architectures (BERT's post-LN embedding path, for one) do not survive the swap."""
        n = len(self.layers)
        if n < 2:
            return False
        s = n // 2
        tok = (torch.arange(1, 9, device=model_device(model)) % int(model.cfg.d_vocab))[None]
        name = f"blocks.{s}.hook_resid_pre"
        seen: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                with hooked(model, [(name, lambda t, hook: seen.__setitem__("x", t.detach()))]):
                    full = model(tok)
                with self.skip(s):
                    part = model(seen["x"], start_at_layer=s)
        except Exception:  # noqa: BLE001 - any failure means: do not skip
            return False
        scale = float(full.abs().max()) or 1.0
        return bool(torch.allclose(part, full, rtol=1e-4, atol=1e-5 * scale))

    @contextmanager
    def skip(self, n: int) -> Iterator[None]:
        saved = [self.layers[i] for i in range(n)]
        try:
            for i in range(n):
                self.layers[i] = _Identity()
            yield
        finally:
            for i, block in enumerate(saved):
                self.layers[i] = block


def _blocks_return_tensors(model: ModelLike, block: torch.nn.Module) -> bool:
    """Whether a block returns a plain tensor (what an identity can stand in for)."""
    out: list[Any] = []
    handle = block.register_forward_hook(lambda m, a, o: out.append(type(o)))
    try:
        tok = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
        with torch.no_grad():
            model(tok, return_type=None)
    except Exception:  # noqa: BLE001 - any failure means: do not skip
        return False
    finally:
        handle.remove()
    return bool(out) and out[0] is Tensor


def _unchanged_rows(
    rows: Tensor, clean_acts: dict[str, Tensor], corrupted_acts: dict[str, Tensor], template: str, *,
    has_extra: bool, all_pos: bool,
) -> Tensor:
    """Which patches copy a clean activation equal, bit for bit and in every prompt, to the
    corrupted one (so they change nothing). Rows are ``layer, [pos], [head/neuron]``."""
    flags = torch.zeros(len(rows), dtype=torch.bool)
    for layer in torch.unique(rows[:, 0]).tolist():
        name = template.format(l=layer)
        clean, corrupted = clean_acts.get(name), corrupted_acts.get(name)
        if clean is None or corrupted is None or clean.shape != corrupted.shape:
            continue
        eq = (clean.to(corrupted.dtype) == corrupted).all(0)  # over prompts: [pos, ...]
        if all_pos:
            eq = eq.all(0)  # [...]
        lead = int(not all_pos) + int(has_extra)  # the patched axes
        eq = eq.flatten(lead).all(-1) if eq.ndim > lead else eq
        sel = rows[:, 0] == layer
        idx = tuple(rows[sel, 1 + i] for i in range(lead))
        flags[sel] = eq.cpu()[idx] if lead else eq.cpu().expand(int(sel.sum()))
    return flags


def _layer_of(hook_name: str | None, n_layers: int) -> int:
    """Block index of a hook name (``n_layers`` for hooks after the blocks or no hook)."""
    if hook_name is None or not hook_name.startswith("blocks."):
        return n_layers
    return int(hook_name.split(".")[1])


def _run_and_cache(sweep: _Sweep, tokens: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    cache: dict[str, Tensor] = {}
    # Keyed by the name asked for: the bridge reports aliases (hook_resid_pre) by their canonical name.
    hooks = [(n, lambda t, hook, n=n: cache.__setitem__(n, t.detach())) for n in names]
    return _run(sweep, tokens, hooks, 1), cache


_OVERHEAD: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def forward_overhead(model: ModelLike) -> float:
    """Fixed cost of one forward pass (seconds): the median of three 2-token passes, measured once
    per model. It sets how many forward passes a sweep is worth splitting into."""
    if model not in _OVERHEAD:
        tok = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
        times = []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                model(tok, return_type=None)
                times.append(time.perf_counter() - t0)
        _OVERHEAD[model] = sorted(times)[1]
    return _OVERHEAD[model]


def _chunk_starts(
    layer: np.ndarray, pos: np.ndarray, k_max: int, *, by_pos: bool, n_pos: int, groups_per_layer: int,
    layers_per_group: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The row order of a plan and where each forward pass starts in it (see :func:`_plan_chunks`)."""
    n = len(layer)
    lg = layer // layers_per_group
    span = max(1, -(-n_pos // groups_per_layer))  # positions per run
    pg = pos // span if by_pos and groups_per_layer > 1 else np.zeros_like(pos)
    order = np.lexsort((pos if by_pos else np.zeros_like(pos), pg, lg))  # the last key sorts first
    key = lg[order] * (n_pos + 1) + pg[order]
    new_group = np.r_[True, key[1:] != key[:-1]] if n else np.zeros(0, bool)
    group_start = np.flatnonzero(new_group)[np.cumsum(new_group) - 1]
    rank = np.arange(n) - group_start
    return order, np.flatnonzero(rank % k_max == 0)


def _split(order: np.ndarray, starts: np.ndarray) -> list[Tensor]:
    """Row ids of each forward pass, from a plan's row order and pass starts."""
    return [torch.from_numpy(c) for c in np.split(order, starts[1:])] if len(order) else []


def _plan_chunks(
    rows: Tensor, k_max: int, *, by_pos: bool, n_pos: int, groups_per_layer: int, layers_per_group: int = 1,
) -> list[Tensor]:
    """Row ids of each forward pass.

    Patches are grouped into runs of ``layers_per_group`` consecutive layers (so a pass can skip
    the blocks before its first layer) and, when positions are reused, into ``groups_per_layer``
    runs of consecutive positions (so a pass starts at its first position); runs longer than
    ``k_max`` patches are split.
    """
    r = rows.numpy()
    pos = r[:, 1] if by_pos else np.zeros(len(r), dtype=r.dtype)
    return _split(*_chunk_starts(r[:, 0], pos, k_max, by_pos=by_pos, n_pos=n_pos, groups_per_layer=groups_per_layer,
                                 layers_per_group=layers_per_group))


def _best_plan(
    rows: Tensor, k_max: int, *, by_pos: bool, n_pos: int, n_layers: int, batch: int, skip: bool,
    metric_layer: int, overhead: float, per_row: float,
) -> list[Tensor]:
    """The chunking with the least estimated time: each pass costs ``overhead`` plus ``per_row``
    for every (row, position, block) it computes; each new prefix start costs a pass too.
    Fewer, larger passes save the fixed cost; finer ones skip more blocks and positions."""
    if not len(rows):
        return []
    r = rows.numpy()
    layer = r[:, 0]
    pos = r[:, 1] if by_pos else np.zeros(len(r), dtype=r.dtype)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for g in sorted({1, 2, 3, 4, 6, 8, 12, 16, n_pos}) if by_pos else [1]:
        for h in sorted({1, 2, 3, 4, 6, n_layers}) if skip else [n_layers]:
            if g > n_pos or h > n_layers:
                continue
            order, starts = _chunk_starts(layer, pos, k_max, by_pos=by_pos, n_pos=n_pos, groups_per_layer=g, layers_per_group=h)
            sizes = np.diff(np.r_[starts, len(order)])
            p0 = pos[order][starts]
            s0 = np.minimum(np.minimum.reduceat(layer[order], starts), metric_layer) if skip else np.zeros_like(p0)
            cost = len(starts) * overhead + per_row * batch * float((sizes * (n_pos - p0) * (n_layers - s0)).sum())
            new_p0 = np.unique(p0[p0 > 0])  # each start position needs its prefix cache
            cost += len(new_p0) * overhead + per_row * batch * n_layers * float(new_p0.sum())
            if best is None or cost < best[0]:
                best = (cost, order, starts)
    assert best is not None
    return _split(best[1], best[2])


def get_act_patch_sink_resid_pre(model: ModelLike, corrupted_tokens: Tensor, clean: Any, metric: PerPromptMetric, **kw: Any) -> PatchingResult:
    """Patch ``hook_resid_pre`` by layer and position (batched :func:`patch_sweep`)."""
    return patch_sweep(model, corrupted_tokens, clean, metric, site="resid_pre", **kw)


def get_act_patch_sink_attn_head_out_by_pos(model: ModelLike, corrupted_tokens: Tensor, clean: Any, metric: PerPromptMetric, **kw: Any) -> PatchingResult:
    """Patch each head's output ``hook_z`` by layer, position and head."""
    return patch_sweep(model, corrupted_tokens, clean, metric, site="z", **kw)


def get_act_patch_sink_kv_by_pos(model: ModelLike, corrupted_tokens: Tensor, clean: Any, metric: PerPromptMetric, *, which: str = "k", **kw: Any) -> PatchingResult:
    """Patch keys (``which="k"``) or values (``"v"``) by layer, position and *key-value* head (GQA-correct)."""
    if which not in ("k", "v"):
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")
    return patch_sweep(model, corrupted_tokens, clean, metric, site=which, **kw)


def get_act_patch_sink_neurons(
    model: ModelLike, corrupted_tokens: Tensor, clean: Any, metric: PerPromptMetric, *, neurons: Sequence[tuple[int, int]], positions: Sequence[int] | None = None, **kw: Any
) -> PatchingResult:
    """Patch chosen MLP neurons (``hook_post``), e.g. super neurons, at chosen positions."""
    P = corrupted_tokens.shape[1]
    pos = list(range(P)) if positions is None else list(positions)
    idx = pd.DataFrame([(layer, p, n) for layer, n in neurons for p in pos], columns=["layer", "pos", "neuron"])
    return patch_sweep(model, corrupted_tokens, clean, metric, site="post", index=idx, **kw)


__all__: Sequence[str] = [
    "SITES",
    "PatchPass",
    "PatchPlan",
    "PatchingResult",
    "SelfCheck",
    "Shortcuts",
    "attention_to_metric",
    "clear_self_checks",
    "execute",
    "get_act_patch_sink_attn_head_out_by_pos",
    "get_act_patch_sink_kv_by_pos",
    "get_act_patch_sink_neurons",
    "get_act_patch_sink_resid_pre",
    "logit_diff_metric",
    "make_plan",
    "normalized_metric",
    "patch_sweep",
    "run_checked",
    "verify",
]
