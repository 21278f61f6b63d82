"""Stage 2 of the causal chain: super neurons.

A few MLP neurons fire enormously on the first token (Llama-2-7B layer 1 neuron 7890 reaches
thousands where its typical activation is below one). Their down-projection row is
*channel-sparse*: almost all of its norm sits in one to three residual dimensions (high
kurtosis), so the huge activation is written into those few dims of the residual stream, which
is the dimension disparity of the next stage. Yu et al. call the dominant entry a *super weight*
(Llama-2-7B ``down_proj[2533, 7890]``, i.e. ``W_out[1][7890, 2533]`` in TransformerLens layout).

Two finders:

* :func:`find_super_neurons` (activations): for every neuron, over a corpus, its
  ``|hook_post|`` (the down-projection input) at the first token and elsewhere, its peak and
  where the peak happened (prompt, position, token). A neuron is *super* when it is extreme both
  by position (mean ``|activation|`` at position 0, or its peak elsewhere, at least
  ``min_ratio`` times its mean at positions >= 1) and within its layer (peak at least
  ``min_layer_ratio`` times the layer's median peak: sparse neurons with a tiny mean but an
  ordinary peak do not count). Found neurons are ranked by the size of what they write into the
  residual stream at their peak. Gated (Llama) and plain (GPT-2, BERT) MLPs alike.
* :func:`find_super_neurons_by_weights` (weights only, the paper's Fig. 8): neurons whose
  ``W_in`` / ``W_gate`` column (``up_proj`` / ``gate_proj`` row) has an unusually large L2 norm.
  These scores depend on weight processing: ``fold_ln`` multiplies ``W_in`` by the LayerNorm
  gain, so results record the model's processing in ``meta``. The activation finder does not
  (folding leaves ``hook_post`` unchanged up to rounding).

For each found neuron the down-projection row ``W_out[layer][neuron]`` is described by its
excess (Fisher) kurtosis, as ``scipy.stats.kurtosis`` computes it, and the residual dims that
carry most of its squared norm.

**Roles.** The position ratio finds every neuron that is extreme somewhere, but only some of
them are links of the chain. Each found neuron gets a ``role``:

* ``"chain"``: it *fires at the first token* (its mean ``|activation|`` at position 0 is at least
  its largest ``|activation|`` at any position >= 1, so its position ratio is measured at
  position 0) and its down-projection row is *channel-sparse*: excess kurtosis at least
  ``min_kurtosis`` (10) **and** at least ``min_top3_share`` (0.5) of the row's squared norm in its
  top 3 residual dims. These are the super neurons of the chain; :attr:`SuperNeurons.chain`
  lists them and :func:`tl_sinks.trace.trace_chain` ablates them.
* ``"first_token"``: fires at the first token, but its down row is dense.
* ``"other_position"``: peaks at some position >= 1 (a rare ordinary token), whatever its row.

Why those thresholds. Yu et al.'s super weight is one dominant entry of a down projection
(Llama-2-7B ``down_proj[2533, 7890]``), and the massive activation it writes lives in one to
three residual dims. A down row that writes such dims has the majority of its squared norm in
at most 3 of them: ``top3_share >= 0.5``. A dense
(Gaussian) row of ``d`` dims stays below about ``6 ln(d) / d`` (its 99th percentile: 0.17 at
``d = 192``, 0.10 at 384, 0.013 at 4096). The top-3 share alone is not enough in small models,
where three dims are a large part of all (0.59 at ``d = 32``); the kurtosis condition guards
that case. A Gaussian row has excess kurtosis ``0 +- sqrt(24 / d)`` (0.34 at ``d = 192``; its
99.9th percentile is below 4 even at ``d = 32``); a row with share ``s`` of its squared norm in
one dim and the rest dense gives about ``d s^2 - 3`` (a one-hot row ``d - 5 + 1/(d - 1)``), so
10 is far outside the noise of a dense row, and every row the top-3 condition accepts reaches
it once ``d`` is about 150 or more (half the norm spread evenly over 3 dims: ``d / 12 - 2``).
In narrow models the kurtosis condition is the stricter one: a row with its norm evenly in
``k`` dims has kurtosis about ``d / k - 3``, so a one-hot row passes from ``d = 15`` on and
three even dims from ``d = 40`` on.

Measured: the two chain super neurons of the embedded default model (L0N504, L2N168) have
kurtosis 47 and 76 and top-3 shares 0.87 and 0.97; its five other high-ratio neurons peak at
positions 2-14 with kurtosis below 1 and top-3 shares below 0.17 (99% of all its down rows:
kurtosis below 5.6, top-3 share below 0.28). MiniLM's five [CLS] super neurons have kurtosis
318-378 and top-3 shares above 0.98.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_sinks._compat import ModelInfo, base_meta, inspect_model, require_hooks
from tl_sinks._driver import run_stages
from tl_sinks._inputs import TokenBatch, token_strings
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.errors import UnsupportedModelError
from tl_sinks.hooks import FiniteGuard, bind_index, selected
from tl_sinks.results import SinkResult, fmt_ratio

DEFAULT_MIN_RATIO = 50.0
DEFAULT_MIN_LAYER_RATIO = 5.0
# A channel-sparse down row (see the module docstring for why these values).
DEFAULT_MIN_KURTOSIS = 10.0
DEFAULT_MIN_TOP3_SHARE = 0.5
ROLES = ("chain", "first_token", "other_position")


# --------------------------------------------------------------------------- kernels
def excess_kurtosis(w: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    """Fisher (excess) kurtosis over the last dim, population moments (scipy's default).

    A Gaussian row gives about 0; a row with all its mass in one of ``d`` entries gives
    ``d - 5 + 1/(d - 1)``.

    Example:
        >>> round(excess_kurtosis(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])).item(), 3)
        0.25
        >>> round(excess_kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0])).item(), 3)
        -2.0
    """
    x = w.double()
    c = x - x.mean(-1, keepdim=True)
    m2 = c.pow(2).mean(-1)
    m4 = c.pow(4).mean(-1)
    return (m4 / m2.pow(2) - 3.0).to(w.dtype if w.is_floating_point() else torch.float32)


def channel_concentration(
    w: Float[Tensor, " d"], k: int = 3, mass: float = 0.9
) -> dict[str, Any]:
    """Where a row's squared norm lives.

    Returns:
        ``top_dims`` (the ``k`` dims of largest ``|w|``), ``top_weights`` (signed),
        ``top1_share`` and ``topk_share`` (shares of the squared norm), and ``dims_for_mass``
        (how many dims hold ``mass`` of the squared norm).

    Example:
        >>> c = channel_concentration(torch.tensor([0.1, 3.0, -0.2, 0.0]), k=2)
        >>> c["top_dims"], round(c["top1_share"], 3), c["dims_for_mass"]
        ([1, 2], 0.994, 1)
    """
    sq = w.double().pow(2)
    total = sq.sum().clamp_min(torch.finfo(torch.float64).tiny)
    order = torch.argsort(w.abs(), descending=True)
    cum = torch.cumsum(sq[order], 0) / total
    top = order[:k]
    return {
        "top_dims": top.tolist(),
        "top_weights": [float(w[i]) for i in top],
        "top1_share": float(cum[0]),
        "topk_share": float(cum[min(k, len(cum)) - 1]),
        "dims_for_mass": int((cum < mass).sum()) + 1,
    }


# Columns describe_down_rows adds: an empty ``found`` has them too, so code that selects them
# works whether or not a model has super neurons.
DOWN_ROW_COLUMNS = ["down_norm", "down_kurtosis", "top_dims", "top_weights", "top1_share", "top3_share", "dims_for_90pct"]


def describe_down_rows(model: ModelLike, layers: Sequence[int], neurons: Sequence[int]) -> pd.DataFrame:
    """Kurtosis and channel concentration of ``W_out[layer][neuron]`` rows."""
    rows = []
    with torch.no_grad():
        for layer, neuron in zip(layers, neurons):
            w = model.blocks[layer].mlp.W_out[neuron].detach().float().cpu()
            c = channel_concentration(w)
            rows.append(
                {
                    "down_norm": float(w.norm()),
                    "down_kurtosis": float(excess_kurtosis(w)),
                    "top_dims": c["top_dims"],
                    "top_weights": c["top_weights"],
                    "top1_share": c["top1_share"],
                    "top3_share": c["topk_share"],
                    "dims_for_90pct": c["dims_for_mass"],
                }
            )
    return pd.DataFrame(rows, columns=DOWN_ROW_COLUMNS)


# Columns super_neuron_roles adds to ``found``.
ROLE_COLUMNS = ["fires_at_first", "channel_sparse", "role"]


def super_neuron_roles(
    first_mean_abs: Iterable[float],
    rest_max_abs: Iterable[float],
    down_kurtosis: Iterable[float],
    top3_share: Iterable[float],
    *,
    min_kurtosis: float = DEFAULT_MIN_KURTOSIS,
    min_top3_share: float = DEFAULT_MIN_TOP3_SHARE,
) -> pd.DataFrame:
    """The role of each neuron in the chain (pure kernel; one entry per neuron).

    ``fires_at_first``: mean ``|activation|`` at position 0 at least the largest ``|activation|``
    at positions >= 1. ``channel_sparse``: down-row excess kurtosis >= ``min_kurtosis`` and
    top-3 share of its squared norm >= ``min_top3_share``. ``role``: ``"chain"`` (both),
    ``"first_token"`` (fires at the first token, dense row) or ``"other_position"``.

    Example:
        >>> super_neuron_roles([24.0, 9.0, 0.01], [0.5, 0.1, 9.5], [47.0, 0.2, 50.0], [0.87, 0.1, 0.9])["role"].tolist()
        ['chain', 'first_token', 'other_position']
    """
    first = torch.as_tensor(list(first_mean_abs), dtype=torch.float64)
    rest = torch.as_tensor(list(rest_max_abs), dtype=torch.float64)
    kurt = torch.as_tensor(list(down_kurtosis), dtype=torch.float64)
    top3 = torch.as_tensor(list(top3_share), dtype=torch.float64)
    at_first = (first >= rest).tolist()
    sparse = ((kurt >= min_kurtosis) & (top3 >= min_top3_share)).tolist()
    role = [("chain" if sp else "first_token") if f else "other_position" for f, sp in zip(at_first, sparse)]
    return pd.DataFrame({"fires_at_first": at_first, "channel_sparse": sparse, "role": role}, columns=ROLE_COLUMNS)


@dataclass(frozen=True)
class AblationTargets:
    """Which super neurons to ablate at position 0 to cut the chain, and why those.

    Attributes:
        neurons: ``[(layer, neuron), ...]``.
        selection: ``"chain"``, ``"first_token"`` (the fallback when no neuron is chain) or
            ``"none"``.
        note: One sentence saying what was chosen.
    """

    neurons: list[tuple[int, int]]
    selection: str
    note: str

    @property
    def labels(self) -> list[str]:
        return [f"L{layer}N{n}" for layer, n in self.neurons]



# --------------------------------------------------------------------------- results
@dataclass(frozen=True, kw_only=True)
class SuperNeurons(SinkResult):
    """Per-neuron activation extremes over a corpus, and the super neurons found.

    Attributes:
        values: ``[layer, neuron]`` position ratio: the larger of the mean ``|activation|`` at
            position 0 and the largest ``|activation|`` at positions >= 1, over the mean
            ``|activation|`` at positions >= 1.
        max_abs: ``[layer, neuron]`` largest ``|activation|`` anywhere.
        max_value: ``[layer, neuron]`` signed activation at that peak.
        max_prompt, max_pos, max_token: ``[layer, neuron]`` where the peak happened.
        first_mean_abs: ``[layer, neuron]`` mean ``|activation|`` at position 0.
        rest_mean_abs: ``[layer, neuron]`` mean ``|activation|`` at positions >= 1.
        rest_max_abs: ``[layer, neuron]`` largest ``|activation|`` at positions >= 1.
        layer_ratio: ``[layer, neuron]`` ``max_abs`` over the median ``max_abs`` of the layer.
        write_norm: ``[layer, neuron]`` ``max_abs`` times the norm of the down-projection row:
            the size of the vector the neuron adds to the residual stream at its peak.
        found: One row per super neuron (``position_ratio >= min_ratio`` and
            ``layer_ratio >= min_layer_ratio``), largest ``write_norm`` first, with its
            down-projection row's kurtosis and top residual dims, and its ``role``
            (``fires_at_first``, ``channel_sparse``; see :func:`super_neuron_roles`).
    """

    values: Tensor
    dims: tuple[str, ...] = ("layer", "neuron")
    value_name: str = "position_ratio"
    max_abs: Tensor
    max_value: Tensor
    max_prompt: Tensor
    max_pos: Tensor
    max_token: Tensor
    first_mean_abs: Tensor
    rest_mean_abs: Tensor
    rest_max_abs: Tensor
    layer_ratio: Tensor
    write_norm: Tensor
    found: pd.DataFrame = field(default_factory=pd.DataFrame)

    def first_ratio(self) -> SinkResult:
        """``[layer, neuron]`` mean ``|activation|`` at position 0 over the mean elsewhere."""
        ratio = self.first_mean_abs / self.rest_mean_abs.clamp_min(torch.finfo(torch.float32).tiny)
        return SinkResult(values=ratio, dims=self.dims, value_name="first_over_rest", meta=self.meta)

    def with_role(self, *roles: str) -> pd.DataFrame:
        """The rows of ``found`` with one of ``roles`` (``"chain"``, ``"first_token"``, ``"other_position"``)."""
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {list(ROLES)}")
        return self.found[self.found["role"].isin(roles)]

    @property
    def chain(self) -> pd.DataFrame:
        """The chain's super neurons: fire at the first token, channel-sparse down row."""
        return self.with_role("chain")

    def ablation_targets(self) -> AblationTargets:
        """The neurons to mean-ablate at position 0: the chain super neurons, else the first-token ones."""
        pairs = lambda f: [(int(r.layer), int(r.neuron)) for r in f.itertuples()]  # noqa: E731
        if len(self.chain):
            return AblationTargets(pairs(self.chain), "chain", "chain super neurons: first token, channel-sparse")
        first = self.with_role("first_token")
        if len(first):
            return AblationTargets(pairs(first), "first_token", (
                "no chain super neuron (first token and channel-sparse down row): ablating the first-token "
                "neurons, whose down rows are dense"))
        return AblationTargets([], "none", "no super neuron fires at the first token")

    def _summary_lines(self) -> list[str]:
        if self.found.empty:
            return [
                f"no neuron with position ratio >= {self.meta.get('min_ratio')} and layer ratio "
                f">= {self.meta.get('min_layer_ratio')}"
            ]
        labels = lambda role: ", ".join(self.with_role(role)["label"])  # noqa: E731
        n = self.found["role"].value_counts()
        parts = [f"{n.get('chain', 0)} chain super neuron(s) (first token, channel-sparse)"
                 + (f": {labels('chain')}" if n.get("chain", 0) else "")]
        if n.get("first_token", 0):
            parts.append(f"{n['first_token']} first-token neuron(s) with a dense down row: {labels('first_token')}")
        if n.get("other_position", 0):
            parts.append(f"{n['other_position']} other high-ratio neuron(s) (peak elsewhere): {labels('other_position')}")
        chain = self.chain
        r = (chain if len(chain) else self.found).iloc[0]
        return [
            "; ".join(parts),
            f"top {r['label']} ({r['role']}): peak {r['max_value']:.1f} at pos "
            f"{r['max_pos']} ({r['str_token']!r}), {fmt_ratio(r['position_ratio'])} its mean at positions >= 1; "
            f"down row kurtosis {r['down_kurtosis']:.0f}, top-3 share {r['top3_share']:.2f}, top dims {r['top_dims']}",
        ]


@dataclass(frozen=True, kw_only=True)
class WeightSuperNeurons(SinkResult):
    """Weight-only super-neuron scores (the paper's Fig. 8).

    Attributes:
        values: ``[layer, neuron]`` the larger of the up and gate norm ratios (norm over the
            layer's median norm).
        up_norm: ``[layer, neuron]`` L2 norm of each neuron's ``W_in`` column (``up_proj`` row).
        gate_norm: ``[layer, neuron]`` same for ``W_gate`` (NaN for non-gated MLPs).
        found: The ``top_k`` neurons per layer with their down-projection row statistics.
    """

    values: Tensor
    dims: tuple[str, ...] = ("layer", "neuron")
    value_name: str = "norm_ratio"
    up_norm: Tensor
    gate_norm: Tensor
    found: pd.DataFrame = field(default_factory=pd.DataFrame)


# --------------------------------------------------------------------------- accumulator
class SuperNeuronAccumulator:
    """Running per-neuron extremes; hooks ``blocks.{l}.mlp.hook_post``."""

    stage = "super_neurons"

    def __init__(
        self,
        model: ModelLike,
        info: ModelInfo,
        *,
        min_ratio: float = DEFAULT_MIN_RATIO,
        min_layer_ratio: float = DEFAULT_MIN_LAYER_RATIO,
        min_kurtosis: float = DEFAULT_MIN_KURTOSIS,
        min_top3_share: float = DEFAULT_MIN_TOP3_SHARE,
        top_k: int = 20,
    ) -> None:
        if not info.has_mlp or info.d_mlp is None:
            raise UnsupportedModelError(
                f"{info.architecture} has no MLP layers (attention-only), so it has no super neurons "
                "to find; drop the super_neurons stage for this model."
            )
        self.model, self.info, self.top_k = model, info, top_k
        self.min_ratio, self.min_layer_ratio = min_ratio, min_layer_ratio
        self.min_kurtosis, self.min_top3_share = min_kurtosis, min_top3_share
        require_hooks(model, self.hook_names(), stage=self.stage)
        L, N = info.n_layers, info.d_mlp
        z = lambda: torch.zeros(L, N)  # noqa: E731
        self.first_sum, self.all_sum, self.max_abs, self.max_value = z(), z(), z(), z()
        self.rest_max = z()
        self.max_prompt = torch.zeros(L, N, dtype=torch.long)
        self.max_pos = torch.zeros(L, N, dtype=torch.long)
        self.max_token = torch.zeros(L, N, dtype=torch.long)
        self.n_first = torch.zeros(())
        self.n_all = torch.zeros(())

    _STATE = ("first_sum", "all_sum", "max_abs", "max_value", "rest_max", "max_prompt", "max_pos", "max_token", "n_first", "n_all")

    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.mlp.hook_post" for layer in range(self.info.n_layers)]

    def fwd_hooks(self, batch: TokenBatch, guard: FiniteGuard) -> list[tuple[str, HookFn]]:
        device = batch.tokens.device
        for name in self._STATE:
            setattr(self, name, getattr(self, name).to(device))
        B, P = batch.tokens.shape
        valid = batch.valid
        padded = batch.is_padded  # one host sync per batch, not per hook
        flat_tokens = batch.tokens.reshape(-1)

        def hook(post: Tensor, hook: Any, layer: int) -> None:
            a = post.float()
            absval = a.abs()  # a new tensor: masking it in place leaves the model's activation alone
            if padded:
                absval.mul_(valid[..., None])  # padded positions never count
            total = absval.sum((0, 1))
            guard.watch(hook.name, total)
            self.all_sum[layer] += total
            first = absval[:, 0]  # [B, N]
            self.first_sum[layer] += first.sum(0)
            # Per-neuron peak and where it is, in two cheap stages (max over positions within
            # each prompt, then over prompts, then one [N, P] gather) instead of an argmax over
            # all B*P rows, which is several times slower on CPU.
            rest_peak = absval[:, 1:].amax(1) if P > 1 else torch.zeros_like(first)  # [B, N], positions >= 1
            if P > 1:
                self.rest_max[layer] = torch.maximum(self.rest_max[layer], rest_peak.amax(0))
            at_first = first >= rest_peak  # ties go to the earlier position, as a flat argmax would
            m, b_idx = torch.where(at_first, first, rest_peak).max(0)  # [N]
            # Where the peak is, for the neurons whose running peak grows: after the first batches
            # that is a few, and on the CPU only those are looked up (every neuron on an accelerator).
            upd = m > self.max_abs[layer]
            cols = selected(upd)
            b, keep = b_idx[cols], upd[cols]
            # Where the peak is not at position 0 it is above |x| there, so the first argmax over
            # all positions lands on a later one.
            p = torch.where(at_first[b, cols], 0, absval[b, :, cols].argmax(-1))
            for state, new in ((self.max_abs, m[cols]), (self.max_value, a[b, p, cols]),
                               (self.max_prompt, batch.prompt_index[b]), (self.max_pos, p),
                               (self.max_token, flat_tokens[b * P + p])):
                state[layer, cols] = torch.where(keep, new, state[layer, cols])

        return [(n, bind_index(hook, layer)) for layer, n in enumerate(self.hook_names())]

    def end_batch(self, batch: TokenBatch) -> None:
        self.n_first += batch.tokens.shape[0]
        self.n_all += batch.valid.float().sum()

    def result(self, meta: dict[str, Any]) -> SuperNeurons:
        n_all, n_first = float(self.n_all), float(self.n_first)
        all_sum, first_sum, max_abs = self.all_sum.cpu(), self.first_sum.cpu(), self.max_abs.cpu()
        rest_n = max(n_all - n_first, 1.0)
        tiny = torch.finfo(torch.float32).tiny
        first_mean = first_sum / max(n_first, 1.0)
        rest_mean = (all_sum - first_sum) / rest_n
        # Extreme by position class: the first token against the rest, or a peak elsewhere
        # against the rest. Comparing with "every other token" would hide a neuron that fires
        # on *every* first token, because the other prompts' first tokens dilute the baseline.
        position_ratio = torch.maximum(first_mean, self.rest_max.cpu()) / rest_mean.clamp_min(tiny)
        layer_ratio = max_abs / max_abs.median(1, keepdim=True).values.clamp_min(tiny)
        down_norm = torch.stack(
            [self.model.blocks[layer].mlp.W_out.detach().float().cpu().norm(dim=1) for layer in range(self.info.n_layers)]
        )
        write = max_abs * down_norm
        cand = torch.nonzero((position_ratio >= self.min_ratio) & (layer_ratio >= self.min_layer_ratio))
        if len(cand):
            order = torch.argsort(write[cand[:, 0], cand[:, 1]], descending=True)[: self.top_k]
            cand = cand[order]
        layers, neurons = cand[:, 0].tolist(), cand[:, 1].tolist()

        def col(t: Tensor, cast: Callable[[Any], Any] = float) -> list[Any]:
            return [cast(t[layer, n]) for layer, n in zip(layers, neurons)]

        found = pd.DataFrame(
            {
                "layer": layers,
                "neuron": neurons,
                "label": [f"L{layer}N{n}" for layer, n in zip(layers, neurons)],
                "max_value": col(self.max_value.cpu()),
                "max_abs": col(max_abs),
                "max_pos": col(self.max_pos.cpu(), int),
                "max_prompt": col(self.max_prompt.cpu(), int),
                "str_token": token_strings(self.model, [int(self.max_token[layer, n]) for layer, n in zip(layers, neurons)]),
                "first_mean_abs": col(first_mean),
                "rest_mean_abs": col(rest_mean),
                "rest_max_abs": col(self.rest_max.cpu()),
                "position_ratio": col(position_ratio),
                "layer_ratio": col(layer_ratio),
                "write_norm": col(write),
            }
        )
        found = pd.concat([found, describe_down_rows(self.model, layers, neurons)], axis=1)
        roles = super_neuron_roles(found["first_mean_abs"], found["rest_max_abs"], found["down_kurtosis"],
                                   found["top3_share"], min_kurtosis=self.min_kurtosis, min_top3_share=self.min_top3_share)
        found = pd.concat([found, roles], axis=1)
        return SuperNeurons(
            values=position_ratio,
            max_abs=max_abs,
            max_value=self.max_value.cpu(),
            max_prompt=self.max_prompt.cpu(),
            max_pos=self.max_pos.cpu(),
            max_token=self.max_token.cpu(),
            first_mean_abs=first_mean,
            rest_mean_abs=rest_mean,
            rest_max_abs=self.rest_max.cpu(),
            layer_ratio=layer_ratio,
            write_norm=write,
            found=found,
            meta={
                **meta,
                "stage": self.stage,
                "site": "blocks.{L}.mlp.hook_post",
                "min_ratio": self.min_ratio,
                "min_layer_ratio": self.min_layer_ratio,
                "min_kurtosis": self.min_kurtosis,
                "min_top3_share": self.min_top3_share,
                "top_k": self.top_k,
            },
        )



def find_super_neurons(
    model: ModelLike,
    prompts: Any,
    *,
    min_ratio: float = DEFAULT_MIN_RATIO,
    min_layer_ratio: float = DEFAULT_MIN_LAYER_RATIO,
    min_kurtosis: float = DEFAULT_MIN_KURTOSIS,
    min_top3_share: float = DEFAULT_MIN_TOP3_SHARE,
    top_k: int = 20,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    require_bos: bool | None = None,
    progress: bool = True,
    cache: Any = None,
) -> SuperNeurons:
    """Find Super Neurons.

    MLP neurons whose activation (``hook_post``) somewhere in the corpus is extreme relative to
    the same neuron everywhere else, with their down-projection row's channel sparsity.

    Args:
        model: A TransformerBridge in eval mode, with MLPs.
        prompts: Strings, a ``[batch, pos]`` token tensor, or token-id lists.
        min_ratio: Position ratio (first-token mean, or peak elsewhere, over the mean at
            positions >= 1) needed to call a neuron super.
        min_layer_ratio: Peak over the layer's median peak needed as well.
        min_kurtosis: Down-row excess kurtosis a ``"chain"`` neuron needs (with ``min_top3_share``).
        min_top3_share: Share of the down row's squared norm in its top 3 dims a ``"chain"``
            neuron needs.
        top_k: At most this many super neurons are described (largest peaks first).
        batch_size: Prompts per forward pass.
        attention_mask: For a padded token tensor: 1 for real tokens.
        prepend_bos: For strings, whether to prepend BOS (``None``: as the checkpoint's tokenizer does).
        require_bos: Raise unless every prompt starts with BOS (``None``: only if the
            checkpoint's tokenizer adds one; see :func:`tl_sinks._inputs.first_token_policy`).
        progress: Show a progress bar (it disappears when done; ignored with ``cache``).
        cache: An ``ActivationCache`` from ``model.run_with_cache`` (or a mapping of hook names to
            tensors) holding ``blocks.{L}.mlp.hook_post`` for every layer. The statistics are then
            computed from it, with the same reductions, instead of a forward pass; ``prompts`` must
            be the tokens it was computed on (still required: the BOS and padding checks read them).

    Returns:
        :class:`SuperNeurons` with ``values`` of shape ``[layer, neuron]`` and ``found``; each
        found neuron has a ``role`` (``"chain"``, ``"first_token"``, ``"other_position"``), and
        :attr:`SuperNeurons.chain` holds the chain's super neurons.

    Raises:
        UnsupportedModelError: For an attention-only model.
    """
    (res,) = run_stages(
        model,
        prompts,
        [lambda m, i: SuperNeuronAccumulator(m, i, min_ratio=min_ratio, min_layer_ratio=min_layer_ratio,
                                             min_kurtosis=min_kurtosis, min_top3_share=min_top3_share, top_k=top_k)],
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
        require_bos=require_bos,
        progress=progress,
        cache=cache,
    )
    return res


def find_super_neurons_by_weights(
    model: ModelLike,
    *,
    layers: Sequence[int] | None = None,
    top_k: int = 5,
) -> WeightSuperNeurons:
    """Weight-only super-neuron finder (the paper's Fig. 8).

    Ranks neurons by the L2 norm of their input weights (``W_in`` column, i.e. ``up_proj`` row;
    and ``W_gate`` for gated MLPs), relative to the median neuron of the same layer. Needs no
    data, but depends on weight processing (``fold_ln`` scales ``W_in`` by the LayerNorm gain):
    ``meta["processing"]`` records what was applied.

    Args:
        model: A TransformerBridge with MLPs.
        layers: Layers to score (default all).
        top_k: Neurons per layer described in ``found``.

    Returns:
        :class:`WeightSuperNeurons` with ``values`` of shape ``[layer, neuron]``.
    """
    info = inspect_model(model)
    if not info.has_mlp:
        raise UnsupportedModelError(f"{info.architecture} has no MLP layers (attention-only)")
    layers = list(range(info.n_layers)) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < info.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {info.n_layers})")
    ups, gates = [], []
    with torch.no_grad():
        for layer in layers:
            mlp = model.blocks[layer].mlp
            ups.append(mlp.W_in.detach().float().cpu().norm(dim=0))
            gates.append(
                mlp.W_gate.detach().float().cpu().norm(dim=0)
                if info.gated_mlp
                else torch.full((info.d_mlp,), float("nan"))
            )
    up, gate = torch.stack(ups), torch.stack(gates)
    up_ratio = up / up.median(1, keepdim=True).values
    gate_ratio = gate / gate.median(1, keepdim=True).values
    score = torch.fmax(up_ratio, gate_ratio)
    rows = []
    for i, layer in enumerate(layers):
        for n in torch.argsort(score[i], descending=True)[:top_k].tolist():
            rows.append(
                {
                    "layer": layer, "neuron": n, "label": f"L{layer}N{n}", "norm_ratio": float(score[i, n]),
                    "up_norm": float(up[i, n]), "gate_norm": float(gate[i, n]),
                }
            )
    found = pd.DataFrame(rows, columns=["layer", "neuron", "label", "norm_ratio", "up_norm", "gate_norm"])
    found = pd.concat([found, describe_down_rows(model, found["layer"].tolist(), found["neuron"].tolist())], axis=1)
    meta = {**base_meta(model, info), "stage": "super_neurons_by_weights", "layers": layers, "top_k": top_k}
    return WeightSuperNeurons(
        values=score, up_norm=up, gate_norm=gate, found=found, meta=meta,
        coords={"layer": layers},
    )


__all__: Sequence[str] = [
    "AblationTargets",
    "SuperNeuronAccumulator",
    "SuperNeurons",
    "WeightSuperNeurons",
    "channel_concentration",
    "describe_down_rows",
    "excess_kurtosis",
    "find_super_neurons",
    "find_super_neurons_by_weights",
    "super_neuron_roles",
]
