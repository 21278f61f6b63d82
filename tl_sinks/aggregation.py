"""Stage 1 of the causal chain: value aggregation and the variance discrepancy.

Under a causal mask the first token attends only to itself, so each head's attention output
there (``hook_z``, before ``W_O``) is a single value vector. A later token at position ``t``
averages ``t + 1`` value vectors, and an average of ``n`` roughly independent vectors has about
``1/n`` of their variance. The first token therefore stands out with a larger output spread;
Li et al. call this the *variance discrepancy* and trace the sink back to it.

For each layer, head and position this stage measures, over a corpus,

* ``var``: the variance of ``z[pos, head_index, :]`` over the ``d_head`` components
  (population variance, i.e. ``unbiased=False``);
* ``rms``: the root mean square of the same components;
* ``var_all_heads``: the variance over all heads concatenated (the input to ``W_O``, as in the
  paper's Fig. 4, which plots its square root);
* ``mean_z``: the mean output per head over every real token (the ``mu`` of the paper's
  deviation-amplification intervention).

and summarises the discrepancy per head as ``var(first) / mean var(rest)``. The uniform-averaging
expectation ``var(first) / (t + 1)`` is in :meth:`ValueAggregation.uniform_expectation`.

Encoders (bidirectional attention) have no such asymmetry: every token averages every value.
Results record ``attention: bidirectional`` so that is never mistaken for a causal finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_sinks._compat import ModelInfo, require_hooks
from tl_sinks._driver import run_stages
from tl_sinks._inputs import TokenBatch
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.hooks import FiniteGuard, bind_index, grow
from tl_sinks.results import SinkResult


# --------------------------------------------------------------------------- kernels
def head_output_spread(
    z: Float[Tensor, "batch pos head_index d_head"],
) -> tuple[Float[Tensor, "batch pos head_index"], Float[Tensor, "batch pos head_index"]]:
    """Population variance and RMS of each head's output over ``d_head`` (pure kernel).

    Example:
        >>> z = torch.tensor([[[[1.0, -1.0, 1.0, -1.0]]]])
        >>> [t.item() for t in head_output_spread(z)]
        [1.0, 1.0]
    """
    var, rms, _ = _spread_moments(z.float())
    return var, rms


def _spread_moments(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Population variance, RMS and mean over the last dim.

    The variance takes two passes: as precise as ``torch.var_mean`` (no ``E[z^2] - E[z]^2``
    cancellation) and about 6x faster on CPU for ``d_head``-sized rows, where ``var_mean``'s
    per-row Welford loop dominates. ``mean(z^2) = var + mean^2`` is a sum of non-negative
    terms, so the RMS has no cancellation either.
    """
    mean = z.mean(-1, keepdim=True)
    var = (z - mean).square().mean(-1)
    mean = mean[..., 0]
    return var, (var + mean.square()).sqrt(), mean


def as_head_vector(z: Tensor, n_heads: int) -> Float[Tensor, "batch pos head_index d_head"]:
    """``hook_z`` as ``[batch, pos, head_index, d_head]`` (some bridges fire it flattened)."""
    if z.ndim == 4:
        return z
    if z.ndim == 3 and z.shape[-1] % n_heads == 0:
        return z.reshape(*z.shape[:2], n_heads, z.shape[-1] // n_heads)
    raise ValueError(f"unexpected hook_z shape {tuple(z.shape)} for {n_heads} heads")


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, kw_only=True)
class ValueAggregation(SinkResult):
    """Spread of each head's attention output by position.

    Attributes:
        values: ``[layer, head_index, pos]`` mean over prompts of the variance of ``z`` over
            ``d_head``.
        rms: ``[layer, head_index, pos]`` mean RMS of ``z``.
        var_all_heads: ``[layer, pos]`` mean variance over all heads concatenated.
        mean_z: ``[layer, head_index, d_head]`` mean of ``z`` over every real token.
        n_prompts: ``[pos]`` prompts that reached each position.
    """

    values: Tensor
    dims: tuple[str, ...] = ("layer", "head_index", "pos")
    value_name: str = "var"
    rms: Tensor
    var_all_heads: Tensor
    mean_z: Tensor
    n_prompts: Tensor

    def _rest(self, t: Tensor) -> Tensor:
        """Token-weighted mean over positions >= 1 of a ``[..., pos]`` per-position mean."""
        w = self.n_prompts[1:].float()
        if float(w.sum()) == 0:
            raise ValueError("every prompt has a single token; there is no 'rest' to compare with")
        return (t[..., 1:] * w).sum(-1) / w.sum()

    def first_rest_ratio(self, *, stat: str = "var") -> SinkResult:
        """Per head: spread at position 0 over the mean spread at positions >= 1.

        Args:
            stat: ``"var"`` (variance ratio) or ``"rms"``.

        Returns:
            :class:`SinkResult` with ``values`` of shape ``[layer, head_index]``.
        """
        t = {"var": self.values, "rms": self.rms}.get(stat)
        if t is None:
            raise ValueError(f"stat must be 'var' or 'rms', got {stat!r}")
        ratio = t[..., 0] / self._rest(t).clamp_min(torch.finfo(torch.float32).tiny)
        return SinkResult(
            values=ratio, dims=("layer", "head_index"), value_name=f"{stat}_first_over_rest", meta=self.meta
        )

    def layer_ratio(self) -> SinkResult:
        """Per layer: variance of the concatenated head outputs, position 0 over the rest."""
        ratio = self.var_all_heads[:, 0] / self._rest(self.var_all_heads)
        return SinkResult(values=ratio, dims=("layer",), value_name="var_first_over_rest", meta=self.meta)

    def uniform_expectation(self) -> SinkResult:
        """``var(first) / (pos + 1)`` per layer: the variance uniform averaging of i.i.d. values gives."""
        pos = torch.arange(self.var_all_heads.shape[1], dtype=torch.float32)
        return SinkResult(
            values=self.var_all_heads[:, :1] / (pos + 1),
            dims=("layer", "pos"),
            value_name="var_uniform_expectation",
            meta=self.meta,
        )

    def _summary_lines(self) -> list[str]:
        r = self.first_rest_ratio().values
        return [
            f"variance ratio first/rest per head: median {float(r.median()):.2f}, "
            f"share of heads > 1: {float((r > 1).float().mean()):.2f}",
            f"attention: {self.meta.get('attention', '?')}",
        ]


# --------------------------------------------------------------------------- accumulator
class AggregationAccumulator:
    """Running spread of ``hook_z``; hooks ``blocks.{l}.attn.hook_z``."""

    stage = "aggregation"

    def __init__(self, model: ModelLike, info: ModelInfo) -> None:
        self.info = info
        require_hooks(model, self.hook_names(), stage=self.stage)
        L, H, D = info.n_layers, info.n_heads, info.d_head
        self.var_sum = torch.zeros(L, H, 0)
        self.rms_sum = torch.zeros(L, H, 0)
        self.var_all_sum = torch.zeros(L, 0)
        self.z_sum = torch.zeros(L, H, D)
        self.n = torch.zeros(0)
        self.n_tokens = torch.zeros(())

    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.attn.hook_z" for layer in range(self.info.n_layers)]

    def fwd_hooks(self, batch: TokenBatch, guard: FiniteGuard) -> list[tuple[str, HookFn]]:
        P = batch.tokens.shape[1]
        device = batch.tokens.device
        for name in ("var_sum", "rms_sum", "var_all_sum", "z_sum", "n", "n_tokens"):
            setattr(self, name, getattr(self, name).to(device))
        self.var_sum = grow(self.var_sum, P, 2)
        self.rms_sum = grow(self.rms_sum, P, 2)
        self.var_all_sum = grow(self.var_all_sum, P, 1)
        self.n = grow(self.n, P, 0)
        valid = batch.valid.float()  # [B, P]
        padded = batch.is_padded

        def hook(z: Tensor, hook: Any, layer: int) -> None:
            z = as_head_vector(z, self.info.n_heads)
            zf = z.float()
            var, rms, mean = _spread_moments(zf)  # [B, P, H]
            guard.watch(hook.name, var)
            if padded:
                self.var_sum[layer, :, :P] += torch.einsum("bph,bp->hp", var, valid)
                self.rms_sum[layer, :, :P] += torch.einsum("bph,bp->hp", rms, valid)
            else:  # every token is real: plain sums (an einsum with a ones mask costs ~5x more)
                self.var_sum[layer, :, :P] += var.sum(0).T
                self.rms_sum[layer, :, :P] += rms.sum(0).T
            # Variance over all heads' dims from the per-head moments (law of total variance:
            # mean within-head variance + variance of the head means; no second pass over z).
            # (Two-pass variance of the head means: torch.var's per-row Welford loop costs more than
            # the rest of this hook for 6-16 heads; equal to rounding.)
            var_all = var.mean(-1) + (mean - mean.mean(-1, keepdim=True)).square().mean(-1)
            self.var_all_sum[layer, :P] += (var_all * valid).sum(0) if padded else var_all.sum(0)
            if padded:
                self.z_sum[layer] += torch.einsum("bphd,bp->hd", zf, valid)
            else:
                self.z_sum[layer] += zf.sum((0, 1))

        return [(n, bind_index(hook, layer)) for layer, n in enumerate(self.hook_names())]

    def end_batch(self, batch: TokenBatch) -> None:
        self.n[: batch.tokens.shape[1]] += batch.valid.float().sum(0)
        self.n_tokens += batch.valid.float().sum()

    def result(self, meta: dict[str, Any]) -> ValueAggregation:
        n = self.n.cpu()
        denom = n.clamp_min(1)
        return ValueAggregation(
            values=self.var_sum.cpu() / denom,
            rms=self.rms_sum.cpu() / denom,
            var_all_heads=self.var_all_sum.cpu() / denom,
            mean_z=self.z_sum.cpu() / self.n_tokens.cpu().clamp_min(1),
            n_prompts=n.long(),
            meta={**meta, "stage": self.stage, "site": "blocks.{L}.attn.hook_z"},
        )



def compute_value_aggregation(
    model: ModelLike,
    prompts: Any,
    *,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = True,
    cache: Any = None,
) -> ValueAggregation:
    """Value Aggregation.

    Per layer, head and position: the spread of each head's attention output before ``W_O``
    (``hook_z``), over a corpus, and the first-token/rest ratio per head.

    Args:
        model: A TransformerBridge in eval mode.
        prompts: Strings, a ``[batch, pos]`` token tensor, or token-id lists.
        batch_size: Prompts per forward pass.
        attention_mask: For a padded token tensor: 1 for real tokens.
        prepend_bos: For strings, whether to prepend BOS (``None``: as the checkpoint's tokenizer does).
        require_bos: Raise unless every prompt starts with BOS (``None``: only if the
            checkpoint's tokenizer adds one; see :func:`tl_sinks._inputs.first_token_policy`).
        progress: Show a progress bar (it disappears when done; ignored with ``cache``).
        cache: An ``ActivationCache`` from ``model.run_with_cache`` (or a mapping of hook names to
            tensors) holding ``blocks.{L}.attn.hook_z`` for every layer. The statistics are then
            computed from it, with the same reductions, instead of a forward pass; ``prompts`` must
            be the tokens it was computed on (still required: the BOS and padding checks read them).

    Returns:
        :class:`ValueAggregation` with ``values`` of shape ``[layer, head_index, pos]``.
    """
    (res,) = run_stages(
        model,
        prompts,
        [AggregationAccumulator],
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
        require_bos=require_bos,
        progress=progress,
        cache=cache,
    )
    return res


__all__: Sequence[str] = [
    "AggregationAccumulator",
    "ValueAggregation",
    "as_head_vector",
    "compute_value_aggregation",
    "head_output_spread",
]
