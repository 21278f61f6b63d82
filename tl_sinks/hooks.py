"""Running accumulating hooks over a corpus.

Each stage is an *accumulator*: it contributes forward hooks that reduce activations to small
fp32 running sums on the fly (never keeping a full ``run_with_cache`` of the corpus), and a
``end_batch`` step that folds per-batch state into those sums with at most one host sync.
:func:`run_accumulators` feeds batches through the model with every accumulator's hooks at once,
so a full scan costs one forward pass per batch.

Hooks are added through ``model.hooks(...)``, whose ``finally`` removes them even when a batch
raises; :func:`hooked` adds a check that nothing was left behind.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tl_sinks._compat import ModelInfo, model_device
from tl_sinks._inputs import PreparedPrompts, TokenBatch, iter_batches
from tl_sinks._progress import tqdm
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.errors import NonFiniteActivationError


class FiniteGuard:
    """Collects "is this reduction finite?" flags on device and checks them once per batch.

    Checking inside each hook would force a host sync per hook; NaN and inf propagate through
    the sums every stage takes, so checking the per-batch reductions catches them at one sync.
    Each watched reduction is summed in float64, one op: the sum is finite exactly when every
    entry is (a NaN or inf stays one, and float32 values cannot overflow a float64 sum; float64
    activations would have to be near 1e308).
    """

    def __init__(self) -> None:
        self._flags: list[tuple[str, Tensor]] = []

    def watch(self, name: str, reduced: Tensor) -> None:
        if reduced.device.type == "mps":  # no float64 there: two ops, as before
            self._flags.append((name, torch.isfinite(reduced).all()))
        else:
            self._flags.append((name, reduced.sum(dtype=torch.float64)))

    def check(self, batch: TokenBatch) -> None:
        flags, self._flags = self._flags, []
        if not flags:
            return
        vals = torch.stack([f for _, f in flags])  # one device per run: all sums, or all bools (mps)
        ok = (torch.isfinite(vals) if vals.is_floating_point() else vals).cpu()
        if bool(ok.all()):
            return
        bad = [name for (name, _), good in zip(flags, ok.tolist()) if not good]
        prompts = batch.prompt_index.tolist()
        raise NonFiniteActivationError(
            f"NaN or inf activations at {bad[0]}"
            f"{f' (and {len(bad) - 1} more hooks)' if len(bad) > 1 else ''} in the batch of "
            f"prompts {prompts[0]}..{prompts[-1]}; the statistics would be meaningless. Check the "
            "model's dtype (fp16 overflow?) and weights."
        )


@runtime_checkable
class Accumulator(Protocol):
    """One stage's running statistics over a corpus."""

    stage: str

    def hook_names(self) -> list[str]:
        """Hook points this accumulator reads (checked to exist before running)."""
        ...

    def fwd_hooks(self, batch: TokenBatch, guard: FiniteGuard) -> list[tuple[str, HookFn]]:
        """Hooks for one batch. They must not modify activations and must not sync the host."""
        ...

    def end_batch(self, batch: TokenBatch) -> None:
        """Fold per-batch state into the running statistics."""
        ...


_HOOK_POINTS: "weakref.WeakKeyDictionary[Any, tuple[int, list[Any]]]" = weakref.WeakKeyDictionary()


def _hook_points(model: ModelLike) -> list[Any]:
    """The model's distinct HookPoints, cached: the bridge's ``hook_dict`` rebuilds its aliases
    on every access, which cost more than a small model's forward pass when done per call."""
    registry = getattr(model, "_hook_registry", None)
    key = len(registry) if isinstance(registry, dict) else -1
    try:
        cached = _HOOK_POINTS.get(model)
    except TypeError:  # not weak-referenceable
        return list(set(model.hook_dict.values()))
    if cached is None or cached[0] != key or key == -1:
        cached = (key, list(set(model.hook_dict.values())))
        _HOOK_POINTS[model] = cached
    return cached[1]


def _n_hook_fns(model: ModelLike) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in _hook_points(model))


@contextmanager
def hooked(model: ModelLike, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[ModelLike]:
    """Add forward hooks for the duration of the block; removed on exit, also after exceptions."""
    before = _n_hook_fns(model)
    try:
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            yield model
    finally:
        after = _n_hook_fns(model)
        if after != before:  # pragma: no cover - guards against a TransformerLens regression
            raise RuntimeError(f"{after - before} hook(s) were left on the model after removal")


@contextmanager
def suspended_hooks(model: ModelLike) -> Iterator[ModelLike]:
    """Suspend every forward hook on the model's HookPoints for the block, then restore them.

    For probe passes that measure the bare model while an outer :func:`hooked` (or a user's
    ``model.hooks``) is active: the outer edits would otherwise change what the probe measures.
    """
    saved = []
    for hp in _hook_points(model):
        if hp._forward_hooks:
            saved.append((hp, hp._forward_hooks))
            hp._forward_hooks = OrderedDict()
    try:
        yield model
    finally:
        for hp, hooks in saved:
            hp._forward_hooks = hooks


def forward_batch(model: ModelLike, batch: TokenBatch, **kwargs: Any) -> Any:
    """Run the model on a right-padded batch, passing the mask only when there is padding."""
    if batch.is_padded:
        kwargs["attention_mask"] = batch.attention_mask
    return model(batch.tokens, **kwargs)


def run_accumulators(
    model: ModelLike,
    info: ModelInfo,
    prepared: PreparedPrompts,
    accumulators: Sequence[Accumulator],
    *,
    batch_size: int = 8,
    progress: bool = True,
    extra_hooks: Sequence[tuple[str, HookFn]] | Callable[[TokenBatch], Sequence[tuple[str, HookFn]]] = (),
    label: str | None = None,
) -> None:
    """Feed every batch of ``prepared`` through ``model`` with all accumulators' hooks.

    Args:
        model: The model.
        info: Its :class:`~tl_sinks._compat.ModelInfo`.
        prepared: Validated prompts.
        accumulators: Stage accumulators; their hooks run together in one forward per batch.
        batch_size: Prompts per forward pass.
        progress: Show a tqdm progress bar.
        extra_hooks: Hooks to add as well (e.g. an intervention), run before the accumulators';
            or a function of the batch returning them (for hooks that need the batch's mask).
        label: What the run is, shown in the progress bar after the stages' names.

    Raises:
        NonFiniteActivationError: If an activation read by a stage is NaN or inf.
    """
    device = model_device(model)
    pad_id = info.pad_token_id if info.pad_token_id is not None else 0
    guard = FiniteGuard()
    bar = tqdm(
        total=len(prepared),
        disable=not progress,
        desc=f"tl_sinks: {', '.join(a.stage for a in accumulators)}" + (f" ({label})" if label else ""),
        unit="prompt",
        leave=False,
    )
    try:
        for batch in iter_batches(prepared, batch_size, pad_id=pad_id):
            batch = batch.to(device)
            hooks = list(extra_hooks(batch) if callable(extra_hooks) else extra_hooks)
            for acc in accumulators:
                hooks += acc.fwd_hooks(batch, guard)
            with torch.no_grad(), hooked(model, hooks):
                forward_batch(model, batch, return_type=None)
            guard.check(batch)
            for acc in accumulators:
                acc.end_batch(batch)
            bar.update(len(batch.lengths))
    finally:
        bar.close()


class CachedHook:
    """Stands in for the ``HookPoint`` a hook function receives when fed from a cache.

    Accumulator hooks read only ``hook.name`` (to name a non-finite activation).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"CachedHook({self.name!r})"


def cached_activation(cache: Any, model: ModelLike, name: str) -> Tensor | None:
    """``cache[name]`` from an ``ActivationCache`` or a mapping; ``None`` if it lacks the hook.

    Also tried: the name the model's ``hook_dict`` resolves ``name`` to (TransformerBridge
    aliases). A cache made with ``remove_batch_dim=True`` gets its batch dim of 1 back.
    """
    def get(n: str) -> Tensor | None:
        try:
            t = cache[n]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
        if not isinstance(t, Tensor):
            return None
        return t.unsqueeze(0) if getattr(cache, "has_batch_dim", True) is False else t

    t = get(name)
    if t is None:  # the bridge's hook_dict is costly to build: only for names the cache lacks
        hp = getattr(model, "hook_dict", {}).get(name)
        alias = getattr(hp, "name", None)
        if isinstance(alias, str) and alias != name:
            t = get(alias)
    return t


def _trim_to_batch(t: Tensor, name: str, batch: TokenBatch) -> Tensor:
    """Check a cached activation against the batch (prompts, positions); drop extra padded positions."""
    B, P = batch.tokens.shape
    pattern = name.endswith(".hook_pattern") or name.endswith(".hook_attn_scores")
    if t.ndim < (4 if pattern else 3) or t.shape[0] != B:
        raise ValueError(
            f"the cache's {name} has shape {tuple(t.shape)}, but {B} prompt(s) were given: pass the "
            "tokens the cache was computed on (a [batch, pos, ...] cache)"
        )
    n_pos = t.shape[-1] if pattern else t.shape[1]
    if n_pos < P or (pattern and t.shape[-2] != n_pos):
        raise ValueError(
            f"the cache's {name} has shape {tuple(t.shape)}, covering {n_pos} positions, but the longest "
            f"prompt has {P} tokens: pass the tokens the cache was computed on"
        )
    if n_pos == P:
        return t
    return t[..., :P, :P] if pattern else t[:, :P]  # trailing padding every row has: never read


def run_cached(
    model: ModelLike,
    info: ModelInfo,
    prepared: PreparedPrompts,
    accumulators: Sequence[Accumulator],
    cache: Any,
) -> None:
    """Feed activations from a precomputed cache through the accumulators' own hooks.

    The same hook functions and reductions as :func:`run_accumulators`, called with the cached
    tensors instead of during a forward pass: ``prepared`` is treated as one right-padded batch
    holding every prompt, in order, which must be the batch the cache was computed on.

    Args:
        model: The model (for hook-name aliases and the tokenizer's pad id).
        info: Its :class:`~tl_sinks._compat.ModelInfo`.
        prepared: The validated prompts the cache was computed on.
        accumulators: Stage accumulators.
        cache: A ``transformer_lens.ActivationCache`` or a mapping from hook names to tensors
            holding every hook the accumulators read.

    Raises:
        ValueError: The cache lacks a hook (all missing hooks are named), or its tensors do not
            match the prompts (number of prompts, positions).
        NonFiniteActivationError: If a cached activation read by a stage is NaN or inf.
    """
    pad_id = info.pad_token_id if info.pad_token_id is not None else 0
    batch = next(iter_batches(prepared, max(len(prepared), 1), pad_id=pad_id))
    names = list(dict.fromkeys(n for acc in accumulators for n in acc.hook_names()))
    acts: dict[str, Tensor] = {}
    missing = []
    for n in names:
        t = cached_activation(cache, model, n)
        if t is None:
            missing.append(n)
        else:
            acts[n] = t
    if missing:
        stages = ", ".join(dict.fromkeys(a.stage for a in accumulators))
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{' ...' if len(missing) > 4 else ''})" if len(missing) > 1 else ""
        raise ValueError(
            f"the cache lacks {missing[0]}{more}, which the {stages} stage reads; run run_with_cache "
            "without names_filter, or with one that keeps it"
        )
    batch = batch.to(next(iter(acts.values())).device)
    acts = {n: _trim_to_batch(t, n, batch) for n, t in acts.items()}
    guard = FiniteGuard()
    with torch.no_grad():
        for acc in accumulators:
            for name, fn in acc.fwd_hooks(batch, guard):
                fn(acts[name], CachedHook(name))
        guard.check(batch)
        for acc in accumulators:
            acc.end_batch(batch)


def bind_index(fn: Callable[..., None], index: int) -> HookFn:
    """A TransformerLens hook ``(tensor, hook)`` that calls ``fn(tensor, hook, index)``."""

    def hook(t: Tensor, hook: Any) -> None:
        fn(t, hook, index)

    return hook


def grow(t: Tensor, n: int, dim: int, fill: float = 0.0) -> Tensor:
    """Extend ``t`` along ``dim`` to length ``n`` with ``fill`` (running per-position sums)."""
    if t.shape[dim] >= n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)


def maybe_any(t: Tensor) -> bool:
    """Whether ``t`` may hold a True entry, asked without a host sync.

    On the CPU, where reading a tensor is a memory read, the answer is exact, so a hook can skip
    work that would only add zeros (a rare event that did not happen). On an accelerator it is
    always ``True``: the hook takes the general path rather than stall the device to find out.
    """
    return bool(t.any()) if t.device.type == "cpu" else True


def selected(mask: Tensor) -> Tensor:
    """Indices to update for a 1-D ``mask``, without a host sync.

    On the CPU, the indices of its True entries; on an accelerator, every index (finding them
    would stall the device). Callers still apply ``mask[indices]`` to what they write, so both
    give the same result.
    """
    if mask.device.type == "cpu":
        return torch.nonzero(mask).flatten()
    return torch.arange(mask.shape[0], device=mask.device)


def valid_mask(batch: TokenBatch) -> Tensor:
    """``[batch, pos]`` bool mask of real tokens."""
    return batch.attention_mask.bool()
