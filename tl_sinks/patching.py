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
import itertools
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    reuse_prefix: bool | None = None,
    skip_layers: bool | None = None,
    skip_unchanged: bool = True,
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
        reuse_prefix: Under a causal mask a patch at position ``p`` leaves positions ``< p``
            as in the corrupted run, so each forward pass can start at its first patched
            position from the corrupted run's cached keys and values (about half the compute
            of a position sweep). ``None`` (default) does so when possible: a causal model,
            no padding mask, a logits metric and a per-position site; ``False`` always runs
            full forward passes. The numbers agree to float rounding.
        skip_layers: Blocks before a patch's layer compute what the corrupted run computed, so a
            forward pass can start at the first patched block from the corrupted residual
            (``start_at_layer``), with the earlier blocks swapped for identities meanwhile (and
            put back on exit). ``None`` (default) does so when the model's block list is found
            and its blocks return plain tensors; ``False`` never does. Exact up to float
            rounding.
        skip_unchanged: A patch whose clean activation equals the corrupted run's bit for bit in
            every prompt (e.g. every position before the first changed token, under a causal
            mask) changes nothing: it gets the corrupted run's metric without a forward pass.
            ``False`` runs it anyway.

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
    k_max = patches_per_forward or max(1, 64 // B)
    has_pos = "pos" in axes
    prefix_ok, why_not = _prefix_reuse_possible(info, has_pos, mask, metric_site)
    if reuse_prefix and not prefix_ok:
        raise ValueError(f"reuse_prefix=True is not possible here: {why_not}")
    use_prefix = prefix_ok if reuse_prefix is None else bool(reuse_prefix)
    skipper = _BlockSkipper.for_model(model) if skip_layers is not False else None
    if skip_layers and skipper is None:
        raise ValueError("skip_layers=True is not possible here: the model's block list was not found or its blocks do not return a plain tensor")
    # Blocks before a chunk's first patched layer (and before the metric's hook) are skipped.
    metric_layer = _layer_of(metric_site, info.n_layers)

    # Copies are interleaved by prompt (row b * K + k is copy k of prompt b), the layout of
    # Hugging Face's ``batch_repeat_interleave`` for the reused prefix cache.
    def per_copy(x: Tensor, K: int) -> Tensor:
        out = []
        for k in range(K):
            v = torch.as_tensor(metric(x[k::K]))
            if v.shape != (B,):
                raise ValueError(f"metric must return a [batch] tensor of length {B}, got shape {tuple(v.shape)}")
            out.append(v.float())
        return torch.stack(out)

    def run(inp: Tensor, hooks: list, K: int, **kwargs: Any) -> Tensor:
        seen: dict[str, Tensor] = {}
        if metric_site is not None:
            hooks = hooks + [(metric_site, lambda t, hook: seen.__setitem__("x", t))]
        if mask is not None:
            kwargs["attention_mask"] = mask.repeat_interleave(K, 0)
        with torch.no_grad(), hooked(model, hooks):
            out = model(inp, **kwargs)
        return seen["x"] if metric_site is not None else out

    if isinstance(clean, Tensor):  # one pass gives the clean activations and the clean metric
        with torch.no_grad():
            clean_out, clean_acts = _run_and_cache(model, run, clean.to(device), names)
        clean_value = per_copy(clean_out, 1)[0]
    else:
        clean_acts = _get_clean(clean, names)
        clean_value = torch.full((B,), float("nan"))
    rows = torch.tensor(index.to_numpy(copy=True), dtype=torch.long)
    # The corrupted run: its output and, for skipping, the residual entering every block.
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(1, info.n_layers)] if skipper is not None else []
    cache_names = list(dict.fromkeys(resid_names + (names if skip_unchanged else [])))
    overhead = forward_overhead(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        corrupted_out, corrupted_cache = _run_and_cache(model, run, corrupted_tokens, cache_names)
    per_row = max(time.perf_counter() - t0 - overhead, 0.0) / (B * P * info.n_layers)
    unchanged = (
        _unchanged_rows(rows, clean_acts, corrupted_cache, template, has_extra=SITES[site][1] is not None, all_pos=all_pos)
        if skip_unchanged else torch.zeros(len(rows), dtype=torch.bool)
    )
    todo = torch.nonzero(~unchanged).flatten()
    plan_todo = _best_plan(
        rows[todo], k_max, by_pos=use_prefix, n_pos=P, n_layers=info.n_layers, batch=B, skip=skipper is not None,
        metric_layer=metric_layer, overhead=overhead, per_row=per_row,
    )
    plan = [todo[ids] for ids in plan_todo]
    corrupted_value = per_copy(corrupted_out, 1)[0]
    prefix_caches: dict[int, Any] = {}
    results = torch.empty(len(rows), B)
    results[unchanged] = corrupted_value.cpu()
    extra = SITES[site][1]
    ar_b = torch.arange(B, device=device)
    n_skipped = 0
    for chunk_ids in tqdm(plan, disable=not progress, desc=f"patching {site}", unit="forward"):
        chunk = rows[chunk_ids]
        K = len(chunk)
        p0 = int(chunk[:, 1].min()) if use_prefix else 0
        s0 = min(int(chunk[:, 0].min()), metric_layer) if skipper is not None else 0
        hooks = []
        for layer in sorted(set(chunk[:, 0].tolist())):
            sel = torch.nonzero(chunk[:, 0] == layer).flatten()
            copies = sel.to(device)  # which copy gets each of this layer's patches
            cols = chunk[sel].to(device)
            clean_act = clean_acts[template.format(l=layer)]

            def hook(act: Tensor, hook: Any, copies: Tensor = copies, cols: Tensor = cols, clean_act: Tensor = clean_act, K: int = K, p0: int = p0) -> Tensor:
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

            hooks.append((template.format(l=layer), hook))
        kwargs: dict[str, Any] = {}
        if p0 > 0:
            if p0 not in prefix_caches:
                # Keys and values of the unpatched prefix, computed once per start position.
                with torch.no_grad():
                    _, prefix_caches[p0] = model(corrupted_tokens[:, :p0], return_type="logits_and_cache")
            kwargs["past_key_values"] = copy.deepcopy(prefix_caches[p0])  # the forward extends it
            kwargs["past_key_values"].batch_repeat_interleave(K)
        if s0 > 0:
            inp = corrupted_cache[f"blocks.{s0}.hook_resid_pre"][:, p0:].repeat_interleave(K, 0)
            with skipper.skip(s0):  # type: ignore[union-attr]
                tail = run(inp, hooks, K, start_at_layer=s0, **kwargs)
            n_skipped += s0 * K
        else:
            tail = run(corrupted_tokens[:, p0:].repeat_interleave(K, 0), hooks, K, **kwargs)
        out = torch.cat([corrupted_out[:, :p0].repeat_interleave(K, 0), tail], dim=1) if p0 > 0 else tail
        results[chunk_ids] = per_copy(out, K).cpu()
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
              "patches_per_forward": k_max, "n_patches": len(rows), "model_name": info.model_name,
              "prefix_reuse": use_prefix, "prefix_reuse_unavailable": None if prefix_ok else why_not,
              "layer_skip": skipper is not None, "n_forwards": len(plan),
              "block_rows_skipped": n_skipped, "n_unchanged_skipped": int(unchanged.sum())},
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


def _run_and_cache(model: ModelLike, run: Callable[..., Tensor], tokens: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    cache: dict[str, Tensor] = {}
    # Keyed by the name asked for: the bridge reports aliases (hook_resid_pre) by their canonical name.
    hooks = [(n, lambda t, hook, n=n: cache.__setitem__(n, t.detach())) for n in names]
    return run(tokens, hooks, 1), cache


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
