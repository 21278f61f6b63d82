"""Stage 4 of the causal chain, measured first: attention sinks.

A *sink* is a key position that receives a large share of attention from the queries that can
see it, whatever its content. For layer ``l``, head ``h`` and key position ``k`` of one prompt
of length ``T`` we follow Gu et al. (2024, "When Attention Sink Emerges in Language Models"):

.. math::

    \\alpha^{l,h}_k = \\frac{1}{|Q_k|} \\sum_{q \\in Q_k} A^{l,h}_{q,k}

where ``Q_k`` are the queries that can attend to ``k``: ``q = k .. T-1`` under a causal mask
(the diagonal included, as in Gu et al.; ``exclude_self=True`` drops it), and every real query
for a bidirectional encoder. The **sink rate** at ``k`` is the share of heads with
``alpha > eps`` (default ``eps = 0.3``), computed per prompt and averaged over prompts, as in
Gu et al. Padded positions never count, neither as queries nor as keys.

For comparison every result carries the *uniform baseline*: what ``alpha`` would be if each
query spread its attention evenly over the keys it can see (``1/n`` for an encoder; the mean of
``1/(q+1)`` over ``q >= k`` under a causal mask).

Sinks other than position 0 (delimiters such as ``.`` or ``\\n``, [SEP]) are found by token:
every occurrence of a token at a position ``k >= 1`` contributes its per-prompt sink rate, and
:meth:`SinkScores.detect_sinks` lists the tokens (and positions) whose mean rate is high.

Example:
    >>> import tl_sinks
    >>> model = tl_sinks.load_model(path)                      # doctest: +SKIP
    >>> scores = tl_sinks.compute_sink_scores(model, ["The cat sat."])  # doctest: +SKIP
    >>> scores.sink_rate(pos=0), scores.mean_received(pos=0)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_sinks._compat import ModelInfo, require_hooks
from tl_sinks._driver import run_stages
from tl_sinks._inputs import TokenBatch, token_strings
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.hooks import FiniteGuard, bind_index, grow
from tl_sinks.results import SinkResult

DEFAULT_EPS = 0.3


# --------------------------------------------------------------------------- kernels
def query_counts(
    lengths: Int[Tensor, " batch"],
    n_key: int,
    *,
    causal: bool = True,
    exclude_self: bool = False,
) -> Int[Tensor, "batch key_pos"]:
    """How many queries see each key (pure kernel; the same for every layer of a batch).

    Example:
        >>> query_counts(torch.tensor([3, 2]), 3).tolist()
        [[3, 2, 1], [2, 1, 0]]
    """
    pos = torch.arange(n_key, device=lengths.device)
    valid = pos[None, :] < lengths[:, None]
    if causal:
        counts = (lengths[:, None] - pos[None, :]).clamp_min(0)
    else:
        counts = lengths[:, None].expand(-1, n_key) * valid
    if exclude_self:
        counts = (counts - valid.long()).clamp_min(0)
    return counts.long()


def attention_received(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    lengths: Int[Tensor, " batch"],
    *,
    causal: bool = True,
    exclude_self: bool = False,
    padded: bool | None = None,
    counts: Int[Tensor, "batch key_pos"] | None = None,
) -> tuple[Float[Tensor, "batch head_index key_pos"], Int[Tensor, "batch key_pos"]]:
    """Mean attention each key receives from the queries that can see it (pure kernel).

    Args:
        pattern: Post-softmax attention, right-padded: row ``b`` is real up to ``lengths[b]``.
        lengths: Real tokens per row.
        causal: Causal mask (queries ``q >= k`` see key ``k``) or bidirectional (all queries).
        exclude_self: Drop the diagonal ``q == k`` from the average.
        padded: Whether any row is shorter than ``pos`` (``None``: work it out, which syncs
            the host; accumulators pass their batch's cached flag).
        counts: :func:`query_counts` for these arguments, when the caller has it already (an
            accumulator computes it once per batch, not once per layer).

    Returns:
        ``(alpha, counts)``: ``alpha[b, h, k]`` the mean over counted queries (exactly 0 where
        none count), and ``counts[b, k]`` how many queries were averaged.

    Example:
        >>> p = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.8, 0.1, 0.1]]]])
        >>> alpha, n = attention_received(p, torch.tensor([3]))
        >>> [round(v, 4) for v in alpha[0, 0].tolist()], n[0].tolist()
        ([0.7667, 0.3, 0.1], [3, 2, 1])
    """
    n_key = pattern.shape[-1]
    if counts is None:
        counts = query_counts(lengths, n_key, causal=causal, exclude_self=exclude_self)
    p = pattern.float()
    if padded is None:
        padded = bool((lengths < pattern.shape[-2]).any())
    if padded or exclude_self:
        valid = torch.arange(n_key, device=pattern.device)[None, :] < lengths[:, None]
    if not padded:
        received = p.sum(-2)  # no padded queries: a plain reduction is ~10x faster than the einsum
    else:
        # Padded queries hold garbage rows: weight them out (a [b, 1, q] x [b, h, q, k] matmul).
        received = (valid[:, None, None, :].to(p.dtype) @ p)[..., 0, :]
    if exclude_self:
        received = received - p.diagonal(dim1=-2, dim2=-1) * valid[:, None, :]
    alpha = received / counts.clamp_min(1)[:, None, :].float()
    if padded or exclude_self or not causal:
        # Some keys may have no counted query (padding, a self-only count of 1 - 1): 0 there. An
        # unpadded causal batch counts P - k >= 1 queries for every key k.
        alpha = torch.where(counts[:, None, :] > 0, alpha, 0.0)
    return alpha, counts


def uniform_received(
    lengths: Int[Tensor, " batch"],
    n_key: int,
    *,
    causal: bool = True,
    exclude_self: bool = False,
) -> Float[Tensor, "batch key_pos"]:
    """``alpha`` that uniform attention would give (pure kernel; 0 where no query counts).

    Under a causal mask query ``q`` gives ``1/(q+1)`` to each visible key, so key ``k`` gets
    the mean of ``1/(q+1)`` over the counted queries; an encoder gives ``1/n`` everywhere.

    Example:
        >>> [round(v, 4) for v in uniform_received(torch.tensor([3]), 3)[0].tolist()]
        [0.6111, 0.4167, 0.3333]
    """
    device = lengths.device
    pos = torch.arange(n_key, device=device)
    valid = pos[None, :] < lengths[:, None]
    if not causal:
        return valid.float() / lengths[:, None].float()
    # harmonic[m] = sum_{j=1..m} 1/j, so sum_{q=a..n-1} 1/(q+1) = harmonic[n] - harmonic[a].
    top = int(lengths.max()) if lengths.numel() else 0
    harmonic = torch.cat([torch.zeros(1, device=device), torch.cumsum(1.0 / torch.arange(1, top + 1, device=device).float(), 0)])
    start = (pos + 1 if exclude_self else pos).clamp_max(top)
    counts = query_counts(lengths, n_key, causal=True, exclude_self=exclude_self)  # lengths - start, or 0
    total = harmonic[lengths][:, None] - harmonic[start][None, :]
    u = total / counts.clamp_min(1).float()
    return torch.where((counts > 0) & valid, u, torch.zeros_like(u))


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, kw_only=True)
class SinkScores(SinkResult):
    """Mean attention received per layer, head and key position, over a corpus.

    Attributes:
        values: ``[layer, head_index, key_pos]`` mean ``alpha`` over prompts long enough to have
            that key position.
        above_eps: ``[layer, head_index, key_pos]`` share of those prompts in which the head's
            ``alpha`` exceeded ``eps`` (per-prompt indicator, Gu et al.).
        n_prompts: ``[key_pos]`` how many prompts contributed at each key position.
        uniform: ``[key_pos]`` mean uniform-attention baseline at each key position.
        tokens: Per-token statistics at positions ``>= 1`` (DataFrame: ``token``, ``str_token``,
            ``count``, ``sink_rate``, ``mean_received``), sorted by ``sink_rate``.
        eps: Threshold of the sink rate.
    """

    values: Tensor
    dims: tuple[str, ...] = ("layer", "head_index", "key_pos")
    value_name: str = "mean_received"
    above_eps: Tensor
    n_prompts: Tensor
    uniform: Tensor
    tokens: pd.DataFrame = field(default_factory=pd.DataFrame)
    eps: float = DEFAULT_EPS

    # headline numbers -------------------------------------------------------
    def _check_pos(self, pos: int) -> None:
        n = self.values.shape[-1]
        if not 0 <= pos < n or int(self.n_prompts[pos]) == 0:
            raise ValueError(f"no prompt reached key position {pos} (scanned positions 0..{n - 1})")

    def sink_rate(self, pos: int = 0) -> float:
        """Gu et al. sink rate at ``pos``: share of (layer, head) with ``alpha > eps``, per prompt."""
        self._check_pos(pos)
        return float(self.above_eps[:, :, pos].mean())

    def sink_rate_by_layer(self, pos: int = 0) -> SinkResult:
        """Sink rate at ``pos`` within each layer."""
        self._check_pos(pos)
        return SinkResult(
            values=self.above_eps[:, :, pos].mean(1), dims=("layer",), value_name="sink_rate", meta=self.meta
        )

    def sink_rate_by_pos(self) -> SinkResult:
        """Sink rate at every key position (NaN where no prompt reached it)."""
        rate = self.above_eps.mean((0, 1))
        rate = torch.where(self.n_prompts > 0, rate, torch.full_like(rate, float("nan")))
        return SinkResult(values=rate, dims=("key_pos",), value_name="sink_rate", meta=self.meta)

    def mean_received(self, pos: int = 0) -> float:
        """Mean over layers and heads of ``alpha`` at ``pos``."""
        self._check_pos(pos)
        return float(self.values[:, :, pos].mean())

    def ratio_to_uniform(self, pos: int = 0) -> float:
        """:meth:`mean_received` divided by the uniform-attention baseline at ``pos``."""
        self._check_pos(pos)
        return self.mean_received(pos) / float(self.uniform[pos])

    def heads(self, pos: int = 0, threshold: float | None = None) -> list[tuple[int, int]]:
        """``(layer, head_index)`` whose mean ``alpha`` at ``pos`` exceeds ``threshold`` (default eps)."""
        self._check_pos(pos)
        thr = self.eps if threshold is None else threshold
        return [tuple(x) for x in torch.nonzero(self.values[:, :, pos] > thr).tolist()]  # type: ignore[misc]

    def detect_sinks(self, *, min_rate: float | None = None, min_count: int = 2) -> pd.DataFrame:
        """Sinks other than position 0.

        Args:
            min_rate: Minimum mean sink rate (default: half the sink rate at position 0, at
                least 0.1), so a secondary sink must be a real fraction of the main one.
            min_count: Minimum occurrences of a token to report it.

        Returns:
            DataFrame with one row per finding: ``kind`` (``"token"`` or ``"position"``), the
            token or position, ``count``, ``sink_rate``, ``mean_received``.
        """
        if min_rate is None:
            min_rate = max(0.1, 0.5 * self.sink_rate(0))
        rows: list[dict[str, Any]] = []
        if not self.tokens.empty:
            t = self.tokens[(self.tokens["sink_rate"] >= min_rate) & (self.tokens["count"] >= min_count)]
            for r in t.itertuples(index=False):
                rows.append(
                    {"kind": "token", "token": int(r.token), "str_token": r.str_token, "key_pos": None,
                     "count": int(r.count), "sink_rate": float(r.sink_rate), "mean_received": float(r.mean_received)}
                )
        rate = self.sink_rate_by_pos().values
        alpha = self.values.mean((0, 1))
        for k in range(1, rate.shape[0]):
            n = int(self.n_prompts[k])
            if n >= min_count and float(rate[k]) >= min_rate:
                rows.append(
                    {"kind": "position", "token": None, "str_token": None, "key_pos": k, "count": n,
                     "sink_rate": float(rate[k]), "mean_received": float(alpha[k])}
                )
        cols = ["kind", "token", "str_token", "key_pos", "count", "sink_rate", "mean_received"]
        return pd.DataFrame(rows, columns=cols).sort_values("sink_rate", ascending=False, ignore_index=True)

    def _summary_lines(self) -> list[str]:
        return [
            f"sink rate at position 0 (eps={self.eps}): {self.sink_rate(0):.3f}",
            f"mean attention received by position 0: {self.mean_received(0):.3f} "
            f"(uniform {float(self.uniform[0]):.3f}, {self.ratio_to_uniform(0):.1f}x)",
            f"attention: {self.meta.get('attention', '?')}",
        ]


# --------------------------------------------------------------------------- accumulator
class SinkAccumulator:
    """Running sink statistics; hooks ``blocks.{l}.attn.hook_pattern``."""

    stage = "sinks"

    def __init__(
        self,
        model: ModelLike,
        info: ModelInfo,
        *,
        eps: float = DEFAULT_EPS,
        exclude_self: bool = False,
    ) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        self.info, self.eps, self.exclude_self = info, eps, exclude_self
        require_hooks(model, self.hook_names(), stage=self.stage)
        self.model = model
        L, H, V = info.n_layers, info.n_heads, info.d_vocab
        self.alpha_sum = torch.zeros(L, H, 0)
        self.above_sum = torch.zeros(L, H, 0)
        self.n = torch.zeros(0)
        self.uniform_sum = torch.zeros(0)
        self.tok_n = torch.zeros(V)
        self.tok_rate = torch.zeros(V)
        self.tok_alpha = torch.zeros(V)
        self._batch: dict[str, Tensor] = {}

    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.info.n_layers)]

    def _ensure(self, device: torch.device, n_pos: int) -> None:
        if self.alpha_sum.device != device:
            for name in ("alpha_sum", "above_sum", "n", "uniform_sum", "tok_n", "tok_rate", "tok_alpha"):
                setattr(self, name, getattr(self, name).to(device))
        self.alpha_sum = grow(self.alpha_sum, n_pos, 2)
        self.above_sum = grow(self.above_sum, n_pos, 2)
        self.n = grow(self.n, n_pos, 0)
        self.uniform_sum = grow(self.uniform_sum, n_pos, 0)

    def fwd_hooks(self, batch: TokenBatch, guard: FiniteGuard) -> list[tuple[str, HookFn]]:
        B, P = batch.tokens.shape
        device = batch.tokens.device
        self._ensure(device, P)
        self._batch = {
            "heads_above": torch.zeros(B, P, device=device),
            "alpha_heads": torch.zeros(B, P, device=device),
        }

        padded = batch.is_padded
        counts = query_counts(batch.lengths, P, causal=self.info.causal, exclude_self=self.exclude_self)
        self._batch["counts"] = counts

        def hook(pattern: Tensor, hook: Any, layer: int) -> None:
            alpha, _ = attention_received(pattern, batch.lengths, causal=self.info.causal,
                                          exclude_self=self.exclude_self, padded=padded, counts=counts)
            guard.watch(hook.name, alpha)
            # alpha is exactly 0 at keys no query counts (and eps > 0), so neither sum needs a mask.
            self.alpha_sum[layer, :, :P] += alpha.sum(0)
            above = (alpha > self.eps).float()
            self.above_sum[layer, :, :P] += above.sum(0)
            self._batch["heads_above"] += above.sum(1)
            self._batch["alpha_heads"] += alpha.sum(1)

        return [(name, bind_index(hook, layer)) for layer, name in enumerate(self.hook_names())]

    def end_batch(self, batch: TokenBatch) -> None:
        counts = self._batch["counts"]
        counted = counts > 0
        P = counts.shape[1]
        self.n[:P] += counted.float().sum(0)
        self.uniform_sum[:P] += uniform_received(
            batch.lengths, P, causal=self.info.causal, exclude_self=self.exclude_self
        ).sum(0)
        n_heads = self.info.n_layers * self.info.n_heads
        rest = counted.clone()
        rest[:, 0] = False
        w = rest.float().reshape(-1)
        toks = batch.tokens.reshape(-1)
        self.tok_n.scatter_add_(0, toks, w)
        self.tok_rate.scatter_add_(0, toks, w * self._batch["heads_above"].reshape(-1) / n_heads)
        self.tok_alpha.scatter_add_(0, toks, w * self._batch["alpha_heads"].reshape(-1) / n_heads)
        self._batch = {}

    def result(self, meta: dict[str, Any]) -> SinkScores:
        n = self.n.cpu()
        denom = n.clamp_min(1)
        seen = torch.nonzero(self.tok_n.cpu() > 0).flatten()
        tok_n = self.tok_n.cpu()[seen]
        table = pd.DataFrame(
            {
                "token": seen.numpy(),
                "str_token": token_strings(self.model, seen.tolist()),
                "count": tok_n.long().numpy(),
                "sink_rate": (self.tok_rate.cpu()[seen] / tok_n).numpy(),
                "mean_received": (self.tok_alpha.cpu()[seen] / tok_n).numpy(),
            }
        ).sort_values(["sink_rate", "count"], ascending=False, ignore_index=True)
        return SinkScores(
            values=self.alpha_sum.cpu() / denom,
            above_eps=self.above_sum.cpu() / denom,
            n_prompts=n.long(),
            uniform=self.uniform_sum.cpu() / denom,
            tokens=table,
            eps=self.eps,
            meta={**meta, "stage": self.stage, "eps": self.eps, "exclude_self": self.exclude_self},
        )



def compute_sink_scores(
    model: ModelLike,
    prompts: Any,
    *,
    eps: float = DEFAULT_EPS,
    exclude_self: bool = False,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = True,
    cache: Any = None,
) -> SinkScores:
    """Sink Scores.

    Mean attention each head pays to each key position over a corpus, the Gu et al. sink rate,
    and per-token statistics for finding sinks other than position 0. One forward pass per batch;
    only ``hook_pattern`` reductions are kept.

    Args:
        model: A TransformerBridge (see :func:`tl_sinks.load_model`), in eval mode.
        prompts: Strings, a ``[batch, pos]`` token tensor, or token-id lists.
        eps: Sink-rate threshold on ``alpha`` (Gu et al. use 0.3).
        exclude_self: Drop the diagonal (a key attending to itself) from ``alpha``.
        batch_size: Prompts per forward pass.
        attention_mask: For a padded token tensor: 1 for real tokens.
        prepend_bos: For strings, whether to prepend BOS (``None``: as the checkpoint's tokenizer does).
        require_bos: Raise unless every prompt starts with BOS ([CLS] for BERT) (``None``: only if the
            checkpoint's tokenizer adds one; see :func:`tl_sinks._inputs.first_token_policy`).
        progress: Show a progress bar (it disappears when done; ignored with ``cache``).
        cache: An ``ActivationCache`` from ``model.run_with_cache`` (or a mapping of hook names to
            tensors) holding ``blocks.{L}.attn.hook_pattern`` for every layer. The statistics are
            then computed from it, with the same reductions, instead of a forward pass; ``prompts``
            must be the tokens it was computed on (still required: the BOS and padding checks read
            them).

    Returns:
        :class:`SinkScores` with ``values`` of shape ``[layer, head_index, key_pos]``.

    Raises:
        ValueError: Bad prompts (see :func:`tl_sinks._inputs.prepare_prompts`), training mode.
        NonFiniteActivationError: NaN/inf attention patterns.
    """
    (res,) = run_stages(
        model,
        prompts,
        [lambda m, i: SinkAccumulator(m, i, eps=eps, exclude_self=exclude_self)],
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
        require_bos=require_bos,
        progress=progress,
        cache=cache,
    )
    return res


__all__: Sequence[str] = [
    "DEFAULT_EPS",
    "SinkAccumulator",
    "SinkScores",
    "attention_received",
    "compute_sink_scores",
    "query_counts",
    "uniform_received",
]
