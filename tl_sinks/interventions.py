"""Stage 5: interventions that make, break and prevent sinks.

Declarative, typed, serialisable specs turned into TransformerLens hooks, applied with the
:func:`intervene` context manager, which removes every hook on exit, also after an exception::

    with tl_sinks.intervene(model, SelfOnlyMask(pos=9), AblateNeurons(neurons=((1, 7890),))):
        logits = model(tokens)

The paper's two sink-creating interventions at a position ``p``:

* :class:`SelfOnlyMask`: token ``p`` attends only to itself, so its attention output is one value
  vector, like the first token's. Implemented on ``hook_z`` (``z[p] = v[p]``, per head, GQA
  aware), which every TransformerLens 4.x attention bridge applies, and mirrored on
  ``hook_pattern`` where the bridge applies pattern edits (HF BERT's does not; see
  :func:`pattern_edits_apply`).
* :class:`AmplifyDeviation`: ``z[p] <- mu + lam * (z[p] - mu)`` with ``mu`` the mean of ``z``
  over the prompt's positions (per head), written as ``z[p] + (lam - 1) * (z[p] - mu)`` so that
  ``lam = 1`` is an exact no-op. Its control :class:`ScaleOutput` (``z[p] <- lam * z[p]``) must
  *not* create a sink (the paper's claim, tested by :func:`tl_sinks.trace.trace_chain`).

Editing ``hook_z`` in layer ``l`` changes the residual stream that layers ``> l`` read, so applying
an intervention in every layer and reading the attention pattern of layer ``l`` measures the
paper's "applied to the preceding layers" setting for every ``l`` at once.

Also: :class:`AblateNeurons` (zero, mean or a fixed value for chosen MLP neurons),
:class:`AblateResidDims` (massive residual dims), and :class:`HeadRMSNorm` (head-wise RMSNorm
applied post hoc to a pretrained model's attention outputs).

Every spec has a ``strength`` (or ``lam``) whose neutral value is an exact no-op (tested with
``atol=0``): blends use ``torch.lerp``, exact at both ends, and ``lam`` enters as
``x + (lam - 1) * (...)``. Specs have ``to_dict()`` / :func:`from_dict` for logging and sharing,
and validate their positions and layers against the model.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from tl_sinks._compat import ModelInfo, inspect_model
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.aggregation import as_head_vector
from tl_sinks.hooks import hooked

PosSpec = int | tuple[int, ...] | None
_REGISTRY: dict[str, type["Intervention"]] = {}
_PATTERN_EDITABLE: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _layers(layers: tuple[int, ...] | None, info: ModelInfo) -> list[int]:
    if layers is None:
        return list(range(info.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < info.n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range for a {info.n_layers}-layer model")
    return list(layers)


def _check_pos(pos: int, n_pos: int, what: str) -> None:
    if not 0 <= pos < n_pos:
        raise ValueError(f"{what}: position {pos} is outside the input (positions 0..{n_pos - 1})")


def _pos_index(pos: PosSpec, n_pos: int, what: str) -> slice | list[int]:
    if pos is None:
        return slice(None)
    ps = [pos] if isinstance(pos, int) else list(pos)
    for p in ps:
        _check_pos(p, n_pos, what)
    return ps


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Base class: a typed, serialisable edit of a model's activations."""

    kind: ClassVar[str] = "intervention"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _REGISTRY[cls.kind] = cls

    def __post_init__(self) -> None:
        # Fail at construction, before any model is touched.
        checks = {
            "strength": lambda v: 0.0 <= float(v) <= 1.0 or "must be in [0, 1]",
            "mode": lambda v: v in ("zero", "mean", "value") or "must be 'zero', 'mean' or 'value'",
            "route": lambda v: v in ("auto", "z", "pattern") or "must be 'auto', 'z' or 'pattern'",
            "pos": lambda v: v is None or all(int(p) >= 0 for p in ([v] if isinstance(v, int) else v)) or "must be >= 0",
            "mu": lambda v: not isinstance(v, str) or v == "positions" or "must be 'positions' or a [layer][head][d_head] list",
            "gain": lambda v: not isinstance(v, str) or v in ("batch_rms", "ones") or "must be 'batch_rms', 'ones' or a [layer][head] list",
        }
        for f in dataclasses.fields(self):
            if f.name in checks:
                ok = checks[f.name](getattr(self, f.name))
                if ok is not True:
                    raise ValueError(f"{type(self).__name__}: {f.name}={getattr(self, f.name)!r} {ok}")

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        """Forward hooks implementing the edit.

        Args:
            model: The model.
            info: Its :class:`~tl_sinks._compat.ModelInfo`.
            valid: ``[batch, pos]`` real-token mask of the input, when known (tl_sinks' own
                runners pass it; statistics such as a mean then skip padding).
        """
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def from_dict(d: dict[str, Any]) -> Intervention:
    """Rebuild an intervention from :meth:`Intervention.to_dict` output."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown intervention kind {kind!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in fields:
            raise ValueError(f"{kind} has no field {k!r}")
        if isinstance(v, list) and k in ("layers", "pos", "dims"):
            v = tuple(v)
        if isinstance(v, list) and k == "neurons":
            v = tuple(tuple(x) for x in v)
        kwargs[k] = v
    return cls(**kwargs)


def _capture(store: dict[int, Tensor], layer: int) -> HookFn:
    def hook(t: Tensor, hook: Any) -> None:
        store[layer] = t

    return hook


def pattern_edits_apply(model: ModelLike) -> bool:
    """Whether edits to ``hook_pattern`` change the model's output (measured once, cached)."""
    if model in _PATTERN_EDITABLE:
        return _PATTERN_EDITABLE[model]
    tokens = torch.arange(3).unsqueeze(0) % int(model.cfg.d_vocab)
    seen: dict[str, Tensor] = {}

    def edit(p: Tensor, hook: Any) -> Tensor:
        p = p.clone()
        p[..., :] = 0.0
        p[..., 0] = 1.0
        return p

    def grab(z: Tensor, hook: Any) -> None:
        seen["z"] = z.detach().clone()

    from tl_sinks._compat import model_device

    device = model_device(model)
    # Bridges that discard pattern edits warn about it; here that is the point of the probe.
    with torch.no_grad(), warnings.catch_warnings(), hooked(model, [("blocks.0.attn.hook_z", grab)]):
        warnings.simplefilter("ignore", UserWarning)
        model(tokens.to(device), return_type=None)
        plain = seen["z"]
        with hooked(model, [("blocks.0.attn.hook_pattern", edit)]):
            model(tokens.to(device), return_type=None)
    editable = not torch.equal(plain, seen["z"])
    _PATTERN_EDITABLE[model] = editable
    return editable


@dataclass(frozen=True, kw_only=True)
class SelfOnlyMask(Intervention):
    """Token ``pos`` attends only to itself (the paper's mask intervention).

    Attributes:
        pos: The position whose attention is restricted.
        layers: Layers to apply it in (default all).
        strength: 1 = fully self-only; 0 = exact no-op; in between mixes the two outputs.
        route: ``"auto"`` edits ``hook_z`` and mirrors the edit on ``hook_pattern`` where the
            bridge applies pattern edits; ``"z"`` or ``"pattern"`` use one route only (to check
            one against the other; ``"pattern"`` raises where pattern edits are discarded).
    """

    kind: ClassVar[str] = "self_only_mask"
    pos: int
    layers: tuple[int, ...] | None = None
    strength: float = 1.0
    route: Literal["auto", "z", "pattern"] = "auto"

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        p, s, rep = self.pos, float(self.strength), info.n_heads_per_kv
        if self.route not in ("auto", "z", "pattern"):
            raise ValueError(f"route must be 'auto', 'z' or 'pattern', got {self.route!r}")
        editable = pattern_edits_apply(model)
        if self.route == "pattern" and not editable:
            raise ValueError(f"{info.architecture}'s attention discards hook_pattern edits; use route='z' or 'auto'")
        mirror = editable and self.route != "z"
        values: dict[int, Tensor] = {}
        out: list[tuple[str, HookFn]] = []
        for layer in _layers(self.layers, info):
            if self.route != "pattern":
                out.append((f"blocks.{layer}.attn.hook_v", _capture(values, layer)))
            if mirror:

                def pat(pattern: Tensor, hook: Any) -> Tensor:
                    _check_pos(p, pattern.shape[-1], "SelfOnlyMask")
                    pattern = pattern.clone()
                    onehot = torch.zeros_like(pattern[:, :, p])
                    onehot[..., p] = 1.0
                    pattern[:, :, p] = torch.lerp(pattern[:, :, p], onehot, s)
                    return pattern

                out.append((f"blocks.{layer}.attn.hook_pattern", pat))
            if self.route == "pattern":
                continue

            def z_hook(z: Tensor, hook: Any, layer: int = layer) -> Tensor:
                zz = as_head_vector(z, info.n_heads)
                _check_pos(p, zz.shape[1], "SelfOnlyMask")
                v = as_head_vector(values.pop(layer), info.n_key_value_heads)
                target = v[:, p].repeat_interleave(rep, dim=1).to(zz.dtype)  # query head h reads kv head h // rep
                zz = zz.clone()
                zz[:, p] = torch.lerp(zz[:, p], target, s)
                return zz.reshape(z.shape)

            out.append((f"blocks.{layer}.attn.hook_z", z_hook))
        return out


def _position_mean(z: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``z [batch, pos, head, d_head]`` over each prompt's real positions."""
    if valid is None:
        return z.mean(1, keepdim=True)
    w = valid[:, : z.shape[1]].to(z.dtype)[:, :, None, None]
    return (z * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)


@dataclass(frozen=True, kw_only=True)
class AmplifyDeviation(Intervention):
    """``z[pos] <- mu + lam * (z[pos] - mu)`` on every head's attention output (paper, Sec. 3.2).

    Attributes:
        pos: The position whose output deviation is amplified.
        lam: Amplification factor; 1 is an exact no-op.
        layers: Layers to apply it in (default all).
        mu: ``"positions"`` (mean of ``z`` over the prompt's real positions, per head) or a
            nested list ``[layer][head_index][d_head]`` (e.g. ``ValueAggregation.mean_z.tolist()``).
    """

    kind: ClassVar[str] = "amplify_deviation"
    pos: int
    lam: float
    layers: tuple[int, ...] | None = None
    mu: str | list = "positions"

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        p, lam = self.pos, float(self.lam)
        if isinstance(self.mu, str) and self.mu != "positions":
            raise ValueError(f"mu must be 'positions' or a [layer][head][d_head] list, got {self.mu!r}")
        fixed = None if isinstance(self.mu, str) else torch.as_tensor(self.mu, dtype=torch.float32)
        if fixed is not None and tuple(fixed.shape) != (info.n_layers, info.n_heads, info.d_head):
            raise ValueError(f"mu has shape {tuple(fixed.shape)}, expected {(info.n_layers, info.n_heads, info.d_head)}")
        out = []
        for layer in _layers(self.layers, info):

            def z_hook(z: Tensor, hook: Any, layer: int = layer) -> Tensor:
                zz = as_head_vector(z, info.n_heads)
                _check_pos(p, zz.shape[1], "AmplifyDeviation")
                if fixed is None:
                    mu = _position_mean(zz, valid)[:, 0]
                else:
                    mu = fixed[layer].to(zz.device, zz.dtype)[None]
                zz = zz.clone()
                zz[:, p] = zz[:, p] + (lam - 1.0) * (zz[:, p] - mu)
                return zz.reshape(z.shape)

            out.append((f"blocks.{layer}.attn.hook_z", z_hook))
        return out


@dataclass(frozen=True, kw_only=True)
class ScaleOutput(Intervention):
    """``z[pos] <- lam * z[pos]``: the control for :class:`AmplifyDeviation` (no sink expected)."""

    kind: ClassVar[str] = "scale_output"
    pos: int
    lam: float
    layers: tuple[int, ...] | None = None

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        p, lam = self.pos, float(self.lam)
        out = []
        for layer in _layers(self.layers, info):

            def z_hook(z: Tensor, hook: Any) -> Tensor:
                zz = as_head_vector(z, info.n_heads)
                _check_pos(p, zz.shape[1], "ScaleOutput")
                zz = zz.clone()
                zz[:, p] = zz[:, p] + (lam - 1.0) * zz[:, p]
                return zz.reshape(z.shape)

            out.append((f"blocks.{layer}.attn.hook_z", z_hook))
        return out


Mode = Literal["zero", "mean", "value"]


def _target(x: Tensor, mode: str, value: float, valid: Tensor | None) -> Tensor:
    """Replacement values ``[batch, 1, k]`` for the selected channels ``x [batch, pos, k]``."""
    if mode == "zero":
        return torch.zeros_like(x[:, :1])
    if mode == "value":
        return torch.full_like(x[:, :1], float(value))
    if mode == "mean":
        # The channel's typical value: mean over real positions >= 1 of the whole batch (the
        # first token is where super neurons and massive dims are extreme, so it is left out).
        rest = x[:, 1:]
        w = torch.ones_like(rest[..., :1]) if valid is None else valid[:, 1 : x.shape[1]].to(x.dtype)[..., None]
        if rest.shape[1] == 0:
            raise ValueError("mode='mean' needs inputs with more than one position")
        return ((rest * w).sum((0, 1)) / w.sum((0, 1)).clamp_min(1))[None, None].expand(x.shape[0], 1, -1)
    raise ValueError(f"mode must be 'zero', 'mean' or 'value', got {mode!r}")


@dataclass(frozen=True, kw_only=True)
class AblateNeurons(Intervention):
    """Set MLP neurons (``hook_post``, the down-projection input) to zero, their mean, or a value.

    Attributes:
        neurons: ``((layer, neuron), ...)``.
        pos: Positions to ablate: an int, a tuple, or ``None`` for all.
        mode: ``"zero"``, ``"mean"`` (the neuron's mean over real positions >= 1 of the batch)
            or ``"value"``.
        value: The value for ``mode="value"``.
        strength: 1 = full ablation, 0 = exact no-op.
    """

    kind: ClassVar[str] = "ablate_neurons"
    neurons: tuple[tuple[int, int], ...]
    pos: PosSpec = None
    mode: Mode = "zero"
    value: float = 0.0
    strength: float = 1.0

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        if not info.has_mlp or info.d_mlp is None:
            raise ValueError(f"{info.architecture} has no MLP neurons to ablate")
        by_layer: dict[int, list[int]] = {}
        for layer, n in self.neurons:
            _layers((layer,), info)
            if not 0 <= n < info.d_mlp:
                raise ValueError(f"neuron {n} out of range for d_mlp={info.d_mlp}")
            by_layer.setdefault(layer, []).append(n)
        _target(torch.zeros(1, 2, 1), self.mode, self.value, None)  # validate mode early
        s = float(self.strength)
        out = []
        for layer, ns in by_layer.items():

            def hook(post: Tensor, hook: Any, ns: list[int] = ns) -> Tensor:
                idx = _pos_index(self.pos, post.shape[1], "AblateNeurons")
                post = post.clone()
                sel = post[:, :, ns]
                tgt = _target(sel, self.mode, self.value, valid)
                sel[:, idx] = torch.lerp(sel[:, idx], tgt.expand_as(sel[:, idx]), s)
                post[:, :, ns] = sel
                return post

            out.append((f"blocks.{layer}.mlp.hook_post", hook))
        return out


@dataclass(frozen=True, kw_only=True)
class AblateResidDims(Intervention):
    """Set residual-stream dims (e.g. a massive activation) to zero, their mean, or a value.

    Applied after each chosen block, at the residual site of :class:`~tl_sinks._compat.ModelInfo`
    (``hook_resid_post``; the raw sum ``ln2.hook_in`` for post-LN models).

    Attributes:
        dims: Residual dims.
        layers: Blocks after which to ablate (default all).
        pos: Positions (int, tuple, or ``None`` for all; default 0, the first token).
        mode, value, strength: As for :class:`AblateNeurons`.
    """

    kind: ClassVar[str] = "ablate_resid_dims"
    dims: tuple[int, ...]
    layers: tuple[int, ...] | None = None
    pos: PosSpec = 0
    mode: Mode = "zero"
    value: float = 0.0
    strength: float = 1.0

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        dims = list(self.dims)
        bad = [d for d in dims if not 0 <= d < info.d_model]
        if bad:
            raise ValueError(f"dim(s) {bad} out of range for d_model={info.d_model}")
        _target(torch.zeros(1, 2, 1), self.mode, self.value, None)
        s = float(self.strength)

        def hook(x: Tensor, hook: Any) -> Tensor:
            idx = _pos_index(self.pos, x.shape[1], "AblateResidDims")
            x = x.clone()
            sel = x[:, :, dims]
            tgt = _target(sel, self.mode, self.value, valid)
            sel[:, idx] = torch.lerp(sel[:, idx], tgt.expand_as(sel[:, idx]), s)
            x[:, :, dims] = sel
            return x

        return [(info.resid_site(layer), hook) for layer in _layers(self.layers, info)]


@dataclass(frozen=True, kw_only=True)
class HeadRMSNorm(Intervention):
    """Head-wise RMSNorm applied post hoc: ``z_h <- g_h * z_h / rms(z_h)`` before ``W_O``.

    The paper trains with it; applied to a pretrained model it equalises every position's output
    scale per head, removing the first token's variance discrepancy at its source.

    Attributes:
        layers: Layers to normalise (default all).
        gain: ``"batch_rms"`` (each head's mean RMS over the input's real positions, so the
            overall scale is kept), ``"ones"``, or a ``[layer][head_index]`` nested list.
        eps: Added to the mean square.
    """

    kind: ClassVar[str] = "head_rmsnorm"
    layers: tuple[int, ...] | None = None
    gain: str | list = "batch_rms"
    eps: float = 1e-6

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        fixed = None
        if isinstance(self.gain, str):
            if self.gain not in ("batch_rms", "ones"):
                raise ValueError(f"gain must be 'batch_rms', 'ones' or a [layer][head] list, got {self.gain!r}")
        else:
            fixed = torch.as_tensor(self.gain, dtype=torch.float32)
            if tuple(fixed.shape) != (info.n_layers, info.n_heads):
                raise ValueError(f"gain has shape {tuple(fixed.shape)}, expected {(info.n_layers, info.n_heads)}")
        out = []
        for layer in _layers(self.layers, info):

            def z_hook(z: Tensor, hook: Any, layer: int = layer) -> Tensor:
                zz = as_head_vector(z, info.n_heads)
                rms = zz.pow(2).mean(-1, keepdim=True).add(self.eps).sqrt()
                if fixed is not None:
                    g = fixed[layer].to(zz.device, zz.dtype)[None, None, :, None]
                elif self.gain == "ones":
                    g = 1.0
                else:
                    g = _position_mean(rms, valid).mean(0, keepdim=True)
                return (zz / rms * g).reshape(z.shape)

            out.append((f"blocks.{layer}.attn.hook_z", z_hook))
        return out


def intervention_hooks(
    model: ModelLike, specs: Sequence[Intervention], valid: Tensor | None = None, info: ModelInfo | None = None
) -> list[tuple[str, HookFn]]:
    """All forward hooks of ``specs``, in order."""
    info = info or inspect_model(model)
    out: list[tuple[str, HookFn]] = []
    for s in specs:
        if not isinstance(s, Intervention):
            raise TypeError(f"{s!r} is not a tl_sinks intervention")
        out += s.hooks(model, info, valid)
    return out


@contextmanager
def intervene(model: ModelLike, *specs: Intervention, attention_mask: Tensor | None = None) -> Iterator[ModelLike]:
    """Apply interventions for the duration of the block; hooks are removed on exit, also after errors.

    Args:
        model: The model.
        *specs: Interventions, applied in order.
        attention_mask: Optional ``[batch, pos]`` mask of the inputs you will run, so that
            statistics (``mode="mean"``, ``mu="positions"``) skip padding.
    """
    valid = None if attention_mask is None else attention_mask.bool()
    with hooked(model, intervention_hooks(model, specs, valid)):
        yield model


__all__: Sequence[str] = [
    "AblateNeurons",
    "AblateResidDims",
    "AmplifyDeviation",
    "HeadRMSNorm",
    "Intervention",
    "ScaleOutput",
    "SelfOnlyMask",
    "from_dict",
    "intervene",
    "intervention_hooks",
    "pattern_edits_apply",
]
