"""Stage 3 of the causal chain: dimension disparity (massive activations).

Super neurons write their huge activation into a few residual dims of the first token, which
then dwarf every other dim: *massive activations* (Sun et al., 2024). Two ways to quantify it,
both computed per layer and position over a corpus:

* **Sun et al. criterion**: a dim is massive when ``|x_d| > abs_threshold`` (default 100) and
  ``|x_d| > rel_threshold * median_d' |x_d'|`` (default 1000), the median taken over the same
  token's dims. Reported as ``ratio_to_median`` and as the share of tokens that qualify.
* **The paper's ratio** (Li et al., Table 1): top dim over the mean of the other dims,
  ``|x|_max / mean_{d != argmax} |x_d|``. The paper measures it after the pre-attention RMSNorm
  (``ln1.hook_out``, gain included: 262x in Llama-2-7B), so it is reported both there
  (``attn_in_paper_ratio``) and on the raw residual stream (``paper_ratio``). OLMo 2 has no
  norm before attention (it normalises the attention and MLP outputs); there the attention reads
  the raw residual stream, so ``attn_in_paper_ratio`` is read at ``attn.hook_in`` and
  ``meta["attn_in_site"]`` says it is not a norm output.

"The residual stream" is ``hook_resid_post`` for pre-LN models. For post-LN encoders (BERT) it is
the raw sum before each block's final LayerNorm (``ln2.hook_in``), since TransformerLens 4.3's
``hook_resid_post`` there is already normalised; ``meta["resid_site"]`` says which.

**Who writes it.** At position 0 the residual stream of a pre-LN model is exactly the embedding
plus every earlier attention and MLP output. The stage keeps the mean of each component's output
at position 0, so :meth:`DimensionDisparity.attribution` splits a massive dim into its writers
(and the parts sum back to the whole, which the tests check). For post-LN models the split is
per block and not additive; ``meta["attribution_exact"]`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_sinks._compat import ModelInfo, require_hooks
from tl_sinks._driver import run_stages
from tl_sinks._inputs import TokenBatch, token_strings
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.hooks import FiniteGuard, bind_index, grow, maybe_any
from tl_sinks.results import SinkResult, fmt_ratio

DEFAULT_ABS_THRESHOLD = 100.0
DEFAULT_REL_THRESHOLD = 1000.0
POS_CLASSES = ("first", "rest")


# --------------------------------------------------------------------------- kernels
def token_disparity(
    x: Float[Tensor, "batch pos d_model"], k: int = 3, *, median: bool = True, max_over: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-token magnitude statistics over ``d_model`` (pure kernel).

    Returns:
        ``top_values`` and ``top_dims`` ``[batch, pos, k]`` (largest ``|x|`` first),
        ``median`` ``[batch, pos]`` (lower median of ``|x|``; skipped when ``median=False``),
        ``rest_mean`` ``[batch, pos]`` (mean ``|x|`` of every dim but the largest), and ``abs_sum``.
        With ``max_over`` (a ``[batch, pos]`` bool mask), also ``masked_max`` ``[d_model]``: the
        largest ``|x|`` of each dim over the selected tokens.

    Example:
        >>> s = token_disparity(torch.tensor([[[0.5, -200.0, 1.0, 0.1]]]), k=1)
        >>> s["top_dims"].item(), s["top_values"].item(), s["median"].item(), round(s["rest_mean"].item(), 3)
        (1, 200.0, 0.5, 0.533)
    """
    a = x.float().abs()
    top_values, top_dims = a.topk(min(k, a.shape[-1]), dim=-1)
    med = lower_median(a) if median else None
    masked_max = None
    if max_over is not None:
        masked_max = (a * max_over[..., None].to(a.dtype)).amax((0, 1))
    d = a.shape[-1]
    # Zero the top dim and sum, rather than subtract it from the total: with a 1000x outlier the
    # subtraction would cancel away most of the other dims' fp32 precision. ``a`` is our copy.
    rest_sum = a.scatter_(-1, top_dims[..., :1], 0.0).sum(-1)
    out = {
        "top_values": top_values,
        "top_dims": top_dims,
        "rest_mean": rest_sum / max(d - 1, 1),
        "abs_sum": rest_sum + top_values[..., 0],
    }
    if med is not None:
        out["median"] = med
    if masked_max is not None:
        out["masked_max"] = masked_max
    return out


def lower_median(a: Float[Tensor, "... d"], *, nonnegative: bool = False) -> Float[Tensor, "..."]:
    """Lower median over the last dim, as ``torch.median`` returns it (pure kernel).

    On CPU this uses NumPy's selection, about 10x faster than ``torch.median`` for ``d_model``
    in the hundreds (the same value: both pick the ``(d - 1) // 2``-th smallest), on a copy
    made by torch (so it counts as tensor memory). With ``nonnegative=True`` (the caller
    guarantees no negative entries, e.g. ``|x|``) the selection runs on the float bits read as
    integers, which order non-negative floats as the floats do, and is about twice as fast.

    Example:
        >>> lower_median(torch.tensor([[3.0, 1.0, 4.0, 2.0]])).tolist()
        [2.0]
        >>> lower_median(torch.tensor([[3.0, 1.0, 4.0, 2.0]]), nonnegative=True).tolist()
        [2.0]
    """
    k = (a.shape[-1] - 1) // 2
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or a.requires_grad:
        return a.median(-1).values
    buf = a.detach().clone(memory_format=torch.contiguous_format)
    x = buf.numpy()
    if nonnegative:
        x = x.view(np.int32 if a.dtype == torch.float32 else np.int64)
    x.partition(k, axis=-1)  # in place, in our copy
    return buf[..., k].clone()


def is_massive(
    value: Tensor, median: Tensor, *, abs_threshold: float = DEFAULT_ABS_THRESHOLD, rel_threshold: float = DEFAULT_REL_THRESHOLD
) -> Tensor:
    """Sun et al.: ``value > abs_threshold`` and ``value > rel_threshold * median``."""
    return (value > abs_threshold) & (value > rel_threshold * median)


def topk_mask(a: Float[Tensor, "... d"], k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of each row of ``a`` (``torch.topk``'s choice on ties)."""
    idx = a.topk(min(k, a.shape[-1]), dim=-1).indices
    return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(-1, idx, True)


def massive_in_top_k(a: Float[Tensor, "... d"], threshold: Float[Tensor, "..."], k: int) -> Tensor:
    """Entries of ``a`` above their row's ``threshold`` that are among the row's ``k`` largest.

    Entries above a per-row threshold are the row's largest, so when a row has at most ``k`` of
    them they all are in its top ``k`` and no top-k is needed. Only a row with more than ``k``
    (rare: Sun-massive dims come one to three per token) takes ``torch.topk``; on an accelerator,
    where asking would sync the host, every call does (see :func:`tl_sinks.hooks.maybe_any`).

    Example:
        >>> massive_in_top_k(torch.tensor([[5.0, 1.0, 7.0, 6.0]]), torch.tensor([4.0]), 2).tolist()
        [[False, False, True, True]]
    """
    above = a > threshold[..., None]
    if maybe_any(above.sum(-1) > k):
        above &= topk_mask(a, k)
    return above


def residual_statistics(
    x: Float[Tensor, "batch pos d_model"],
    valid: Tensor,
    *,
    padded: bool,
    k: int = 4,
    abs_threshold: float = DEFAULT_ABS_THRESHOLD,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
) -> dict[str, Any]:
    """Everything the disparity stage reduces from one residual-stream activation (pure kernel).

    The same numbers as :func:`token_disparity` plus the Sun et al. test, at the cost of one
    ``|x|`` copy, one max, one median selection and a few passes, instead of a top-k per token
    (which cost as much as the small default model's matmuls). The top dim of each token is the
    one equal to its max (``torch.topk`` picks an arbitrary one among exact ties; this counts
    each tied dim, and none in an all-zero row).

    Args:
        x: The residual stream, right-padded.
        valid: ``[batch, pos]`` real tokens.
        padded: Whether any row is padded (the batch's cached flag).
        k: Per token, Sun-massive dims are counted among its ``k`` largest (as the top-k did).

    Returns:
        ``top1``, ``median``, ``rest_mean``, ``abs_sum`` (``[batch, pos]``); ``massive_token``
        (``[batch, pos]`` real tokens whose largest dim is Sun-massive); per position class
        (0: position 0, 1: positions >= 1, real tokens only) ``top_dim_counts`` and
        ``massive_counts`` (``[d_model]``) and ``massive_events`` (``(dims, |x|)`` to
        scatter-add in token order, or ``None`` when there are none); ``rest_max``
        (``[d_model]`` largest ``|x|`` over positions >= 1, ``None`` for one position).
    """
    a = x.float().abs()  # a copy: the model's activation is never modified
    B, P, D = a.shape
    top1 = a.amax(-1)
    med = lower_median(a, nonnegative=True)
    # 1.0 at each token's largest dim, else 0.0: a / max is 1 there and below 1 elsewhere (a float
    # quotient of a < t never rounds up to 1). Float arithmetic, as a bool compare costs 4x here.
    # An all-zero row has no top dim (torch.topk named an arbitrary one).
    is_top = (a / top1.clamp_min(torch.finfo(a.dtype).tiny)[..., None]).floor_()
    restf = valid[:, 1:, None].to(a.dtype) if padded else None
    if P == 1:
        rest_max = None
    elif padded:
        rest_max = (a[:, 1:] * restf).amax(1).amax(0)
    else:
        rest_max = a[:, 1:].amax(1).amax(0)
    rest_top = is_top[:, 1:] * restf if padded else is_top[:, 1:]
    top_dim_counts = (is_top[:, 0].sum(0), rest_top.sum(1).sum(0))
    # Any dim of a token is massive iff its largest is: the test is a per-token threshold.
    massive_token = is_massive(top1, med, abs_threshold=abs_threshold, rel_threshold=rel_threshold) & valid
    massive_counts, massive_events = [], []
    threshold = None
    for cls in (slice(0, 1), slice(1, None)):
        if not maybe_any(massive_token[:, cls]):  # no massive token in the class: nothing to add
            massive_counts.append(torch.zeros(D, device=a.device))
            massive_events.append(None)
            continue
        if threshold is None:
            threshold = torch.where(massive_token, (rel_threshold * med).clamp_min(abs_threshold), torch.inf)
        part, thr = a[:, cls], threshold[:, cls]
        m = massive_in_top_k(part, thr, k)
        massive_counts.append(m.sum((0, 1)).to(a.dtype))
        dims = torch.arange(D, device=a.device).expand(part.shape).reshape(-1)
        massive_events.append((dims, (part * m).reshape(-1)))
    # The sum of every dim but the largest: zero it (a - 1 * max is exactly 0 there, a - 0 * max
    # is a elsewhere) and sum, rather than subtract it from the total: with a 1000x outlier the
    # subtraction would cancel most of the other dims' fp32 precision. The same sum, in the same
    # order, as token_disparity's.
    rest_sum = a.addcmul_(is_top, top1[..., None], value=-1.0).sum(-1)
    return {
        "top1": top1, "median": med, "rest_mean": rest_sum / max(D - 1, 1), "abs_sum": rest_sum + top1,
        "massive_token": massive_token, "top_dim_counts": top_dim_counts, "massive_counts": massive_counts,
        "massive_events": massive_events, "rest_max": rest_max,
    }


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, kw_only=True)
class DimensionDisparity(SinkResult):
    """Massive activations per layer and position over a corpus.

    Attributes:
        values: ``[layer, pos]`` mean largest ``|x|`` of the residual stream.
        median: ``[layer, pos]`` mean median ``|x|``.
        ratio_to_median: ``[layer, pos]`` mean of ``top / median`` (Sun et al.).
        paper_ratio: ``[layer, pos]`` mean of ``top / mean of the other dims`` (Li et al.).
        attn_in_paper_ratio: ``[layer, pos]`` the same at the attention's input: after the
            pre-attention norm, or, for models with no norm there (OLMo 2), the raw residual the
            attention reads (``meta["attn_in_site"]`` / ``meta["attn_in_is_norm_output"]`` say which).
        massive_fraction: ``[layer, pos]`` share of tokens with a Sun-massive dim.
        n_prompts: ``[pos]`` prompts that reached each position.
        top_dim_counts: ``[layer, pos_class, d_model]`` how often each dim was the largest,
            at the first token and elsewhere.
        massive_counts, massive_sum: ``[layer, pos_class, d_model]`` Sun-massive events per dim
            and the sum of their ``|x|``.
        first_mean_abs: ``[layer, d_model]`` mean ``|x|`` at position 0.
        first_mean: ``[layer, d_model]`` mean signed ``x`` at position 0.
        rest_max_abs: ``[layer, d_model]`` largest ``|x|`` at positions >= 1.
        components: ``[component, d_model]`` mean output at position 0 of the embedding and of
            each attention and MLP layer (labels in ``component_labels``).
        massive_tokens: Tokens at positions >= 1 that carried a Sun-massive dim (``n_events``
            counts one per layer in which the token qualified).
        n_first, n_rest: Tokens counted in each position class.
    """

    values: Tensor
    dims: tuple[str, ...] = ("layer", "pos")
    value_name: str = "top_abs"
    median: Tensor
    ratio_to_median: Tensor
    paper_ratio: Tensor
    attn_in_paper_ratio: Tensor
    massive_fraction: Tensor
    n_prompts: Tensor
    top_dim_counts: Tensor
    massive_counts: Tensor
    massive_sum: Tensor
    first_mean_abs: Tensor
    first_mean: Tensor
    rest_max_abs: Tensor
    components: Tensor
    component_labels: tuple[str, ...]
    massive_tokens: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_first: int = 0
    n_rest: int = 0

    # headline numbers -------------------------------------------------------
    def _pos_mean(self, t: Tensor, pos: int | str) -> Tensor:
        if pos == "rest":
            w = self.n_prompts[1:].float()
            return (t[:, 1:] * w).sum(1) / w.sum().clamp_min(1)
        if not isinstance(pos, int) or not 0 <= pos < t.shape[1]:
            raise ValueError(f"pos must be 'rest' or an index in [0, {t.shape[1]}), got {pos!r}")
        return t[:, pos]

    def disparity_by_layer(self, pos: int | str = 0, *, site: str = "attn_in") -> SinkResult:
        """Paper's ratio (top dim / mean of the others) per layer at ``pos`` (or ``"rest"``).

        Args:
            pos: A position, or ``"rest"`` for the token-weighted mean over positions >= 1.
            site: ``"attn_in"`` (the attention's input: after the pre-attention norm, as in the
                paper, where the model has one) or ``"resid"``.
        """
        t = {"attn_in": self.attn_in_paper_ratio, "resid": self.paper_ratio}.get(site)
        if t is None:
            raise ValueError(f"site must be 'attn_in' or 'resid', got {site!r}")
        return SinkResult(values=self._pos_mean(t, pos), dims=("layer",), value_name=f"paper_ratio_{site}", meta=self.meta)

    def disparity(self, pos: int | str = 0, *, site: str = "attn_in") -> float:
        """Largest per-layer paper ratio at ``pos`` (the paper's dimension disparity)."""
        return float(self.disparity_by_layer(pos, site=site).values.max())

    def top_dims(self) -> pd.DataFrame:
        """Per layer: the dim that is most often the largest at the first token, and its size."""
        rows = []
        for layer in range(self.values.shape[0]):
            counts = self.top_dim_counts[layer, 0]
            d = int(counts.argmax())
            rows.append(
                {
                    "layer": layer,
                    "dim": d,
                    "share_of_prompts": float(counts[d] / max(self.n_first, 1)),
                    "first_mean_abs": float(self.first_mean_abs[layer, d]),
                    "rest_max_abs": float(self.rest_max_abs[layer, d]),
                    "paper_ratio": float(self.paper_ratio[layer, 0]),
                    "ratio_to_median": float(self.ratio_to_median[layer, 0]),
                }
            )
        return pd.DataFrame(rows)

    def attribution(self, dim: int, layer: int) -> pd.DataFrame:
        """Split the mean value of ``dim`` at position 0 after ``layer`` into its writers.

        Returns:
            One row per component up to ``layer`` (embedding, attention and MLP layers):
            ``component``, ``contribution`` (mean output in ``dim`` at position 0), and
            ``share`` (contribution over the residual value). For pre-LN models the
            contributions sum to ``first_mean[layer, dim]``.
        """
        n = 1 + 2 * (layer + 1)
        contrib = self.components[:n, dim]
        total = float(self.first_mean[layer, dim])
        return pd.DataFrame(
            {
                "component": list(self.component_labels[:n]),
                "contribution": contrib.numpy(),
                "share": (contrib / total).numpy() if total != 0 else float("nan"),
            }
        )

    def writer(self, dim: int, layer: int) -> str:
        """The component whose output at position 0 pushes ``dim`` furthest toward its value."""
        n = 1 + 2 * (layer + 1)
        sign = 1.0 if float(self.first_mean[layer, dim]) >= 0 else -1.0
        return self.component_labels[int((self.components[:n, dim] * sign).argmax())]

    def massive_dims(self, *, collapse: bool = True) -> pd.DataFrame:
        """Dims that met the Sun et al. criterion.

        Args:
            collapse: One row per (position class, dim) with the layer range, instead of one
                row per (layer, position class, dim).

        Returns:
            Columns ``pos_class`` (``first``/``rest``), ``dim``, ``layer`` (or ``first_layer``
            and ``last_layer``), ``n_events``, ``fraction`` of tokens in the class,
            ``mean_abs`` over the events, and ``writer`` for the first token.
        """
        idx = torch.nonzero(self.massive_counts > 0).tolist()
        rows = []
        for layer, c, d in idx:
            n = float(self.massive_counts[layer, c, d])
            denom = self.n_first if c == 0 else self.n_rest
            rows.append(
                {
                    "pos_class": POS_CLASSES[c],
                    "dim": d,
                    "layer": layer,
                    "n_events": int(n),
                    "fraction": n / max(denom, 1),
                    "mean_abs": float(self.massive_sum[layer, c, d]) / n,
                    "writer": self.writer(d, layer) if c == 0 else None,
                }
            )
        cols = ["pos_class", "dim", "layer", "n_events", "fraction", "mean_abs", "writer"]
        df = pd.DataFrame(rows, columns=cols)
        if not collapse or df.empty:
            return df
        out = []
        for (pc, d), g in df.groupby(["pos_class", "dim"], sort=False):
            first = g.sort_values("layer").iloc[0]
            out.append(
                {
                    "pos_class": pc,
                    "dim": int(d),
                    "first_layer": int(g["layer"].min()),
                    "last_layer": int(g["layer"].max()),
                    "n_layers": int(len(g)),
                    "max_mean_abs": float(g["mean_abs"].max()),
                    "max_fraction": float(g["fraction"].max()),
                    "writer": first["writer"],
                }
            )
        return pd.DataFrame(out).sort_values(["pos_class", "max_mean_abs"], ascending=[True, False], ignore_index=True)

    def _summary_lines(self) -> list[str]:
        td = self.top_dims()
        best = td.loc[td["first_mean_abs"].idxmax()]
        return [
            f"largest first-token dim: {int(best['dim'])} at layer {int(best['layer'])} "
            f"(mean |x| {best['first_mean_abs']:.1f}, {fmt_ratio(best['ratio_to_median'])} the median)",
            f"dimension disparity (paper ratio, max over layers) at position 0: "
            f"{self.disparity(0):.1f} {self.meta.get('attn_in_label', 'after the attention norm')}, {self.disparity(0, site='resid'):.1f} on the residual; "
            f"rest {self.disparity('rest'):.1f}",
        ]


# --------------------------------------------------------------------------- accumulator
class DisparityAccumulator:
    """Running residual-magnitude statistics at the residual, attention-input and component sites."""

    stage = "disparity"

    def __init__(
        self,
        model: ModelLike,
        info: ModelInfo,
        *,
        abs_threshold: float = DEFAULT_ABS_THRESHOLD,
        rel_threshold: float = DEFAULT_REL_THRESHOLD,
        k: int = 4,
    ) -> None:
        self.model, self.info = model, info
        self.abs_threshold, self.rel_threshold, self.k = abs_threshold, rel_threshold, k
        L, D, V = info.n_layers, info.d_model, info.d_vocab
        self.component_labels = ("embed",) + tuple(
            s for layer in range(L) for s in (f"{layer}_attn_out", f"{layer}_mlp_out")
        )
        require_hooks(model, self.hook_names(), stage=self.stage)
        self.per_pos = {n: torch.zeros(L, 0) for n in ("top1", "median", "ratio_med", "paper", "sun", "attn_in_paper")}
        self.n = torch.zeros(0)
        self.top_dim_counts = torch.zeros(L, 2, D)
        self.massive_counts = torch.zeros(L, 2, D)
        self.massive_sum = torch.zeros(L, 2, D)
        self.first_abs = torch.zeros(L, D)
        self.first_signed = torch.zeros(L, D)
        self.rest_max = torch.zeros(L, D)
        self.components = torch.zeros(len(self.component_labels), D)
        self.massive_tok = torch.zeros(V)
        self.n_first = 0
        self.n_rest = 0

    def hook_names(self) -> list[str]:
        info = self.info
        names = ["blocks.0.hook_resid_pre"]
        for layer in range(info.n_layers):
            names += [info.resid_site(layer), info.attn_in_site(layer), f"blocks.{layer}.hook_attn_out"]
            if info.has_mlp:
                names.append(f"blocks.{layer}.hook_mlp_out")
        return list(dict.fromkeys(names))

    def _to(self, device: torch.device) -> None:
        if self.n.device == device:
            return
        for k in list(self.per_pos):
            self.per_pos[k] = self.per_pos[k].to(device)
        for name in ("n", "top_dim_counts", "massive_counts", "massive_sum", "first_abs", "first_signed", "rest_max", "components", "massive_tok"):
            setattr(self, name, getattr(self, name).to(device))

    def fwd_hooks(self, batch: TokenBatch, guard: FiniteGuard) -> list[tuple[str, HookFn]]:
        info = self.info
        P = batch.tokens.shape[1]
        self._to(batch.tokens.device)
        for k in self.per_pos:
            self.per_pos[k] = grow(self.per_pos[k], P, 1)
        self.n = grow(self.n, P, 0)
        valid = batch.valid
        validf = valid.float()
        padded = batch.is_padded
        rest = valid.clone()
        rest[:, 0] = False

        def resid_hook(x: Tensor, hook: Any, layer: int) -> None:
            # One copy of |x| and one selection (the median); the top dim comes from a max,
            # and only the rare Sun-massive dims need a top-k (see residual_statistics).
            s = residual_statistics(x, valid, padded=padded, k=self.k, abs_threshold=self.abs_threshold,
                                    rel_threshold=self.rel_threshold)
            guard.watch(hook.name, s["abs_sum"] * validf if padded else s["abs_sum"])
            top1, med = s["top1"], s["median"]
            tiny = torch.finfo(torch.float32).tiny
            pp = self.per_pos
            pp["top1"][layer, :P] += (top1 * validf).sum(0)
            pp["median"][layer, :P] += (med * validf).sum(0)
            pp["ratio_med"][layer, :P] += (top1 / med.clamp_min(tiny) * validf).sum(0)
            pp["paper"][layer, :P] += (top1 / s["rest_mean"].clamp_min(tiny) * validf).sum(0)
            massive_tok = s["massive_token"]  # [B, P]: the token has a Sun-massive dim (its largest is one)
            pp["sun"][layer, :P] += massive_tok.float().sum(0)
            for c in range(2):
                self.top_dim_counts[layer, c] += s["top_dim_counts"][c]
                self.massive_counts[layer, c] += s["massive_counts"][c]
                events = s["massive_events"][c]
                if events is not None:  # scatter-add in token order: the same sums as one event at a time
                    dims, values = events
                    self.massive_sum[layer, c].scatter_add_(0, dims, values)
            x0 = x[:, 0].float()
            self.first_abs[layer] += x0.abs().sum(0)
            self.first_signed[layer] += x0.sum(0)
            if s["rest_max"] is not None:
                self.rest_max[layer] = torch.maximum(self.rest_max[layer], s["rest_max"])
            self.massive_tok.scatter_add_(0, batch.tokens.reshape(-1), (massive_tok & rest).reshape(-1).float())

        def attn_in_hook(x: Tensor, hook: Any, layer: int) -> None:
            # Normalised input (every dim O(1)): total minus max keeps fp32 precision here, and
            # skips the top-k and scatter of the residual path.
            a = x.float().abs()
            top = a.amax(-1)
            rest_mean = (a.sum(-1) - top) / max(a.shape[-1] - 1, 1)
            tiny = torch.finfo(torch.float32).tiny
            self.per_pos["attn_in_paper"][layer, :P] += (top / rest_mean.clamp_min(tiny) * validf).sum(0)

        def component_hook(x: Tensor, hook: Any, index: int) -> None:
            self.components[index] += x[:, 0].float().sum(0)

        hooks: list[tuple[str, HookFn]] = [("blocks.0.hook_resid_pre", bind_index(component_hook, 0))]
        for layer in range(info.n_layers):
            hooks.append((info.resid_site(layer), bind_index(resid_hook, layer)))
            hooks.append((info.attn_in_site(layer), bind_index(attn_in_hook, layer)))
            hooks.append((f"blocks.{layer}.hook_attn_out", bind_index(component_hook, 1 + 2 * layer)))
            if info.has_mlp:
                hooks.append((f"blocks.{layer}.hook_mlp_out", bind_index(component_hook, 2 + 2 * layer)))
        return hooks

    def end_batch(self, batch: TokenBatch) -> None:
        self.n[: batch.tokens.shape[1]] += batch.valid.float().sum(0)
        self.n_first += int(batch.tokens.shape[0])
        self.n_rest += int(batch.lengths.sum()) - int(batch.tokens.shape[0])

    def result(self, meta: dict[str, Any]) -> DimensionDisparity:
        n = self.n.cpu()
        denom = n.clamp_min(1)
        pp = {k: v.cpu() / denom for k, v in self.per_pos.items()}
        nf = max(self.n_first, 1)
        seen = torch.nonzero(self.massive_tok.cpu() > 0).flatten()
        mt = pd.DataFrame(
            {
                "token": seen.numpy(),
                "str_token": token_strings(self.model, seen.tolist()),
                "n_events": self.massive_tok.cpu()[seen].long().numpy(),
            }
        ).sort_values("n_events", ascending=False, ignore_index=True)
        info = self.info
        return DimensionDisparity(
            values=pp["top1"],
            median=pp["median"],
            ratio_to_median=pp["ratio_med"],
            paper_ratio=pp["paper"],
            attn_in_paper_ratio=pp["attn_in_paper"],
            massive_fraction=pp["sun"],
            n_prompts=n.long(),
            top_dim_counts=self.top_dim_counts.cpu(),
            massive_counts=self.massive_counts.cpu(),
            massive_sum=self.massive_sum.cpu(),
            first_mean_abs=self.first_abs.cpu() / nf,
            first_mean=self.first_signed.cpu() / nf,
            rest_max_abs=self.rest_max.cpu(),
            components=self.components.cpu() / nf,
            component_labels=self.component_labels,
            massive_tokens=mt,
            n_first=self.n_first,
            n_rest=self.n_rest,
            meta={
                **meta,
                "stage": self.stage,
                "resid_site": info.resid_site_description,
                "attn_in_site": info.attn_in_site_description,
                "attn_in_is_norm_output": info.attn_in_is_norm_output,
                "attn_in_label": info.attn_in_label,
                "attribution_exact": info.additive_resid,
                "abs_threshold": self.abs_threshold,
                "rel_threshold": self.rel_threshold,
            },
        )



def compute_dimension_disparity(
    model: ModelLike,
    prompts: Any,
    *,
    abs_threshold: float = DEFAULT_ABS_THRESHOLD,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = True,
    cache: Any = None,
) -> DimensionDisparity:
    """Dimension Disparity.

    Massive activations per layer and position: the largest residual dims, their ratio to the
    median (Sun et al.), the paper's top-over-rest ratio, and which component writes each
    massive dim at the first token.

    Args:
        model: A TransformerBridge in eval mode.
        prompts: Strings, a ``[batch, pos]`` token tensor, or token-id lists.
        abs_threshold: Sun et al. absolute threshold on ``|x|`` (100).
        rel_threshold: Sun et al. threshold on ``|x| / median`` (1000).
        batch_size: Prompts per forward pass.
        attention_mask: For a padded token tensor: 1 for real tokens.
        prepend_bos: For strings, whether to prepend BOS (``None``: as the checkpoint's tokenizer does).
        require_bos: Raise unless every prompt starts with BOS (``None``: only if the checkpoint's
            tokenizer adds one; see :func:`tl_sinks.scan`).
        progress: Show a progress bar (it disappears when done; ignored with ``cache``).
        cache: An ``ActivationCache`` from ``model.run_with_cache`` (or a mapping of hook names to
            tensors) holding the residual sites it reads: ``blocks.0.hook_resid_pre``, each block's
            residual stream (``hook_resid_post``; ``ln2.hook_in`` for post-LN models), the
            attention's input (``ln1.hook_out``; ``hook_resid_pre`` post-LN, ``attn.hook_in``
            without a pre-attention norm), ``hook_attn_out`` and ``hook_mlp_out``. The statistics
            are then computed from it, with the same reductions, instead of a forward pass;
            ``prompts`` must be the tokens it was computed on (still required: the BOS and padding
            checks read them).

    Returns:
        :class:`DimensionDisparity` with ``values`` of shape ``[layer, pos]``.
    """
    (res,) = run_stages(
        model,
        prompts,
        [lambda m, i: DisparityAccumulator(m, i, abs_threshold=abs_threshold, rel_threshold=rel_threshold)],
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
        require_bos=require_bos,
        progress=progress,
        cache=cache,
    )
    return res


__all__: Sequence[str] = [
    "DimensionDisparity",
    "DisparityAccumulator",
    "compute_dimension_disparity",
    "is_massive",
    "massive_in_top_k",
    "residual_statistics",
    "token_disparity",
    "topk_mask",
]
