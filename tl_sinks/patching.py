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

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_sinks._compat import inspect_model, model_device, require_hooks
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


def _axis_sizes(site: str, info: Any, n_pos: int, all_pos: bool) -> dict[str, int]:
    extra = SITES[site][1]
    sizes = {"layer": info.n_layers}
    if not all_pos:
        sizes["pos"] = n_pos
    if extra == "head_index":
        sizes["head_index"] = info.n_heads
    elif extra == "kv_head_index":
        sizes["kv_head_index"] = info.n_key_value_heads
    elif extra == "neuron":
        if info.d_mlp is None:
            raise ValueError(f"{info.architecture} has no MLP neurons to patch")
        sizes["neuron"] = info.d_mlp
    return sizes


def _get_clean(model: ModelLike, clean: Any, names: list[str], attention_mask: Tensor | None) -> dict[str, Tensor]:
    if isinstance(clean, Tensor):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        with torch.no_grad():
            _, cache = model.run_with_cache(clean, names_filter=names, **kwargs)
        return {n: cache[n] for n in names}
    try:
        return {n: clean[n] for n in names}
    except KeyError as e:
        raise ValueError(f"the clean cache lacks {e.args[0]}; cache it, or pass the clean tokens instead") from e


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
    progress: bool = False,
) -> PatchingResult:
    """Patch clean activations into a corrupted run, many patches per forward pass.

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
        progress: Show a progress bar.

    Returns:
        :class:`PatchingResult` with ``values [*axes, batch]``.

    Raises:
        ValueError: Unknown site, clean/corrupted shape mismatch, a metric that does not return
            ``[batch]``, or a patch index out of range.
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose from {sorted(SITES)}")
    info = inspect_model(model)
    if corrupted_tokens.ndim != 2:
        raise ValueError(f"corrupted_tokens must be [batch, pos], got shape {tuple(corrupted_tokens.shape)}")
    B, P = corrupted_tokens.shape
    if isinstance(clean, Tensor) and clean.shape != corrupted_tokens.shape:
        raise ValueError(f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted_tokens.shape)} differ in shape")
    template = SITES[site][0]
    sizes = _axis_sizes(site, info, P, all_pos)
    axes = list(sizes)
    if index is None:
        index = pd.DataFrame(list(itertools.product(*[range(n) for n in sizes.values()])), columns=axes)
        shape: tuple[int, ...] | None = tuple(sizes.values())
    else:
        missing = [a for a in axes if a not in index.columns]
        if missing:
            raise ValueError(f"index lacks column(s) {missing} for site {site!r}")
        index = index[axes].reset_index(drop=True)
        for a in axes:
            if len(index) and not (0 <= index[a].min() and index[a].max() < sizes[a]):
                raise ValueError(f"index column {a!r} out of range [0, {sizes[a]})")
        shape = None
    layers = sorted(set(index["layer"].tolist()))
    names = [template.format(l=layer) for layer in layers]
    require_hooks(model, names + ([metric_site] if metric_site else []), stage="patching")
    device = model_device(model)
    corrupted_tokens = corrupted_tokens.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    clean_acts = _get_clean(model, clean.to(device) if isinstance(clean, Tensor) else clean, names, mask)
    k_max = patches_per_forward or max(1, 64 // B)

    def run(tokens: Tensor, hooks: list, n_copies: int) -> Tensor:
        seen: dict[str, Tensor] = {}
        if metric_site is not None:
            hooks = hooks + [(metric_site, lambda t, hook: seen.__setitem__("x", t))]
        kwargs = {} if mask is None else {"attention_mask": mask.repeat(n_copies, 1)}
        with torch.no_grad(), hooked(model, hooks):
            logits = model(tokens, **kwargs)
        x = seen["x"] if metric_site is not None else logits
        out = []
        for k in range(n_copies):
            v = torch.as_tensor(metric(x[k * B : (k + 1) * B]))
            if v.shape != (B,):
                raise ValueError(f"metric must return a [batch] tensor of length {B}, got shape {tuple(v.shape)}")
            out.append(v.float())
        return torch.stack(out)

    clean_value = run(clean.to(device), [], 1)[0] if isinstance(clean, Tensor) else torch.full((B,), float("nan"))
    corrupted_value = run(corrupted_tokens, [], 1)[0]
    rows = torch.tensor(index.to_numpy(copy=True), dtype=torch.long)
    results = torch.empty(len(rows), B)
    extra = SITES[site][1]
    ar_b = torch.arange(B, device=device)
    chunks = range(0, len(rows), k_max)
    for start in tqdm(chunks, disable=not progress, desc=f"patching {site}", unit="forward"):
        chunk = rows[start : start + k_max]
        K = len(chunk)
        hooks = []
        for layer in sorted(set(chunk[:, 0].tolist())):
            sel = torch.nonzero(chunk[:, 0] == layer).flatten()
            copies = sel.to(device)  # which copy gets each of this layer's patches
            cols = chunk[sel].to(device)
            clean_act = clean_acts[template.format(l=layer)]

            def hook(act: Tensor, hook: Any, copies: Tensor = copies, cols: Tensor = cols, clean_act: Tensor = clean_act) -> Tensor:
                act = act.clone()
                b = (copies[:, None] * B + ar_b[None, :])  # [n, B] rows of the patched copies
                if all_pos:
                    if extra is None:
                        act[b] = clean_act[None].expand(len(copies), *clean_act.shape).to(act.dtype)
                    else:
                        h = cols[:, 1][:, None].expand_as(b)
                        act[b, :, h] = clean_act[ar_b[None, :], :, h].to(act.dtype)
                else:
                    pos = cols[:, 1][:, None].expand_as(b)
                    if extra is None:
                        act[b, pos] = clean_act[ar_b[None, :], pos].to(act.dtype)
                    else:
                        h = cols[:, 2][:, None].expand_as(b)
                        act[b, pos, h] = clean_act[ar_b[None, :], pos, h].to(act.dtype)
                return act

            hooks.append((template.format(l=layer), hook))
        results[start : start + K] = run(corrupted_tokens.repeat(K, 1), hooks, K).cpu()
    values = results.reshape(*shape, B) if shape is not None else results
    dims = tuple(axes) + ("batch",) if shape is not None else ("patch", "batch")
    return PatchingResult(
        values=values,
        dims=dims,
        value_name="metric",
        clean=clean_value.cpu(),
        corrupted=corrupted_value.cpu(),
        index=index,
        meta={"site": site, "hook": template, "all_pos": all_pos, "metric_site": metric_site,
              "patches_per_forward": k_max, "n_patches": len(rows), "model_name": info.model_name},
    )


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
    "PatchingResult",
    "attention_to_metric",
    "get_act_patch_sink_attn_head_out_by_pos",
    "get_act_patch_sink_kv_by_pos",
    "get_act_patch_sink_neurons",
    "get_act_patch_sink_resid_pre",
    "logit_diff_metric",
    "normalized_metric",
    "patch_sweep",
]
