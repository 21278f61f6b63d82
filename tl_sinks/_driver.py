"""The accumulator driver: prompts in, stage results out, one forward pass per batch.

Every stage is an accumulator (:class:`tl_sinks.hooks.Accumulator`). Running a set of them over a
corpus takes three steps, each a function here, so that a caller above the stages (``scan``,
``trace``) can put its own work between them:

1. :func:`prepare_corpus`: validate and tokenise the prompts once (a
   :class:`~tl_sinks._inputs.PreparedPrompts`; one given is used as it is);
2. :func:`build`: construct the accumulators (each checks the hooks it needs);
3. :func:`execute`: run the corpus through the model with every accumulator's hooks (or feed them
   a precomputed cache), and collect their results with the shared provenance.

:func:`run_stages` does all three. The driver sits below the stages and knows nothing about any
of them, nor about interventions: extra hooks (an intervention's) come in as a function of the
batch, and extra provenance as a dict. :func:`tl_sinks.scan.run_stages` adds interventions on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from tl_sinks._compat import ModelInfo, base_meta, inspect_model
from tl_sinks._inputs import PreparedPrompts, TokenBatch, prepare_prompts
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.hooks import Accumulator, run_accumulators, run_cached

AccumulatorFactory = Callable[[ModelLike, ModelInfo], Accumulator]
ExtraHooks = Sequence[tuple[str, HookFn]] | Callable[[TokenBatch], Sequence[tuple[str, HookFn]]]


def prepare_corpus(
    model: ModelLike,
    prompts: Any,
    *,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    info: ModelInfo | None = None,
    for_cache: bool = False,
) -> PreparedPrompts:
    """Validated prompts, prepared once (see :func:`tl_sinks._inputs.prepare_prompts`).

    A :class:`~tl_sinks._inputs.PreparedPrompts` is returned as it is: it was validated when it
    was made, under the first-token policy it records, so ``attention_mask``, ``prepend_bos``
    and ``require_bos`` must not be given with it (they would be silently ignored otherwise).

    Raises:
        ValueError: No prompts, prepared prompts with tokenisation arguments, or bad prompts.
    """
    if prompts is None:
        raise ValueError(
            "no prompts given" + ("; with cache=, pass the tokens the cache was computed on (the BOS "
                                  "and padding checks read them)" if for_cache else "")
        )
    if isinstance(prompts, PreparedPrompts):
        given = [k for k, v in (("attention_mask", attention_mask), ("prepend_bos", prepend_bos),
                                ("require_bos", require_bos)) if v is not None]
        if given:
            raise ValueError(f"the prompts are already prepared; {', '.join(given)} applies only when preparing them")
        if for_cache:
            raise ValueError("with cache=, pass the tokens (and attention_mask) the cache was computed on, not "
                             "prepared prompts: the padding check reads them")
        return prompts
    info = info or inspect_model(model)
    return prepare_prompts(model, info, prompts, attention_mask=attention_mask, prepend_bos=prepend_bos,
                           require_bos=require_bos)


def build(model: ModelLike, info: ModelInfo, factories: Sequence[AccumulatorFactory]) -> list[Accumulator]:
    """One accumulator per factory (each checks that the model has the hooks it reads)."""
    return [f(model, info) for f in factories]


def execute(
    model: ModelLike,
    info: ModelInfo,
    prepared: PreparedPrompts,
    accumulators: Sequence[Accumulator],
    *,
    batch_size: int = 8,
    progress: bool = False,
    extra_hooks: ExtraHooks = (),
    cache: Any = None,
    attention_mask: Tensor | None = None,
    meta: dict[str, Any] | None = None,
    label: str | None = None,
) -> list[Any]:
    """Run the accumulators over ``prepared`` and return their results, in order.

    Args:
        model: The model.
        info: Its :class:`~tl_sinks._compat.ModelInfo`.
        prepared: The validated prompts.
        accumulators: From :func:`build`.
        batch_size: Prompts per forward pass.
        progress: Show a progress bar.
        extra_hooks: Hooks to run before the accumulators' in every forward pass (or a function
            of the batch returning them); not allowed with ``cache``.
        cache: An ``ActivationCache`` or a mapping of hook names to tensors computed on
            ``prepared`` (one right-padded batch): no forward pass runs, the accumulators' hooks
            are fed the cached tensors (:func:`tl_sinks.hooks.run_cached`).
        attention_mask: The mask the cached tokens came with (checked to be right-padded).
        meta: Extra provenance added to every result's ``meta``.
        label: What this run is, for the progress bar (next to the stages' names).
    """
    if cache is not None:
        _check_right_padded(attention_mask)
        run_cached(model, info, prepared, accumulators, cache)
        run_meta = {**base_meta(model, info), **prepared.meta(), "batch_size": len(prepared), "source": "cache"}
    else:
        run_accumulators(model, info, prepared, accumulators, batch_size=batch_size, progress=progress,
                         extra_hooks=extra_hooks, label=label)
        run_meta = {**base_meta(model, info), **prepared.meta(), "batch_size": batch_size}
    run_meta.update(meta or {})
    return [a.result(run_meta) for a in accumulators]  # type: ignore[attr-defined]


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
    cache: Any = None,
) -> list[Any]:
    """Prepare the prompts, build the accumulators, run the corpus once, return their results.

    ``prompts`` may be a :class:`~tl_sinks._inputs.PreparedPrompts` (used as it is). With
    ``cache`` no forward pass runs (see :func:`execute`); ``prompts`` must then be the tokens
    the cache was computed on, and a padded token tensor must be right-padded.
    """
    info = inspect_model(model)
    prepared = prepare_corpus(model, prompts, attention_mask=attention_mask, prepend_bos=prepend_bos,
                              require_bos=require_bos, info=info, for_cache=cache is not None)
    accs = build(model, info, factories)
    return execute(model, info, prepared, accs, batch_size=batch_size, progress=progress, cache=cache,
                   attention_mask=attention_mask)


def _check_right_padded(attention_mask: Tensor | None) -> None:
    """Cached activations sit where the tokens were: position 0 must be each row's first token."""
    if attention_mask is None:
        return
    am = attention_mask.detach().cpu().long()
    if am.ndim == 2 and am.shape[1] > 1 and bool((am[:, 1:] > am[:, :-1]).any()):
        raise ValueError(
            "with cache=, a padded token tensor must be right-padded (attention_mask 1...1 0...0 in "
            "every row): the cached positions of a left-padded batch do not start at the first token"
        )


__all__: Sequence[str] = ["AccumulatorFactory", "build", "execute", "prepare_corpus", "run_stages"]
