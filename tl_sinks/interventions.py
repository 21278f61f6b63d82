"""Stage 5: interventions that make, break and prevent sinks.

Declarative, typed, serialisable specs turned into TransformerLens hooks, applied with the
:func:`intervene` context manager, which removes every hook on exit, also after an exception::

    with tl_sinks.intervene(model, SelfOnlyMask(pos=9), AblateNeurons(neurons=((1, 7890),))):
        logits = model(tokens)

The paper's two sink-creating interventions at a position ``p``:

* :class:`SelfOnlyMask`: token ``p`` attends only to itself, so its attention output is one value
  vector, like the first token's. Made on ``hook_pattern`` where the bridge applies pattern
  edits; where it discards them (bridges that delegate attention to the HF module: GPT-J, OPT,
  BERT, RoBERTa) made on ``hook_z`` (``z[p] = v[p]``, per head, GQA aware), with
  ``hook_pattern`` rewritten to the pattern that amounts to, so statistics read from it are
  what the model used. A self-check per model (:func:`pattern_readout`) verifies
  ``hook_z == hook_pattern @ hook_v`` under the mask; where it fails, pattern statistics under
  the mask are refused.
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
``x + (lam - 1) * (...)``. Specs have ``to_dict()`` / :func:`from_dict` for logging and sharing.
Every field is checked at construction (type, range, finiteness; a one-line ``ValueError``
naming the field), and positions and layers again against the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from tl_sinks._compat import ModelInfo, inspect_model
from tl_sinks._types import HookFn, ModelLike
from tl_sinks.aggregation import as_head_vector
from tl_sinks.hooks import hooked, suspended_hooks

PosSpec = int | tuple[int, ...] | None
_REGISTRY: dict[str, type["Intervention"]] = {}
# Probe results per model, keyed on the processing state (a later compat-mode switch re-probes).
_PATTERN_EDITABLE: "weakref.WeakKeyDictionary[Any, tuple[tuple, bool]]" = weakref.WeakKeyDictionary()
_DISCARDED_PATTERN_EDIT = r"A hook on \S*hook_pattern returned a modified tensor"
_READOUT: "weakref.WeakKeyDictionary[Any, tuple[tuple, PatternReadout]]" = weakref.WeakKeyDictionary()


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


# --------------------------------------------------------------------------- field validation
# Each spec field has a check that returns the normalised value (lists -> tuples, numpy ints ->
# int) or raises _Bad with the reason. __post_init__ and from_dict share them, so a bad value is
# a one-line ValueError naming the field however the spec was built (a float layer would
# otherwise become a hook name like "blocks.0.5.attn.hook_z").
Check = Callable[[Any], Any]
_repr = reprlib.Repr()  # short, one-line reprs of bad values (keyword arguments need Python 3.12)
_repr.maxlist, _repr.maxtuple, _repr.maxlevel, _repr.maxstring, _repr.maxother = 4, 4, 2, 40, 40
_short = _repr.repr


class _Bad(Exception):
    """A field value failed its check (the message is the reason)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _int(lo: int = 0) -> Check:
    def check(v: Any) -> int:
        if not _is_int(v):
            raise _Bad(f"must be an int, got {type(v).__name__}")
        if v < lo:
            raise _Bad(f"must be >= {lo}")
        return int(v)

    return check


def _real(lo: float | None = None, hi: float | None = None) -> Check:
    where = "in [0, 1]" if (lo, hi) == (0.0, 1.0) else f">= {lo}" if lo is not None else ""

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise _Bad(f"must be a number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise _Bad(f"must be finite{f' and {where}' if where else ''}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _Bad(f"must be {where}")
        return float(v)

    return check


def _choice(*options: str) -> Check:
    said = " or ".join(repr(o) for o in options) if len(options) < 3 else (
        ", ".join(repr(o) for o in options[:-1]) + f" or {options[-1]!r}"
    )

    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            raise _Bad(f"must be {said}")
        return v

    return check


def _ints(*, optional: bool = False, unique: bool = False) -> Check:
    """A non-empty sequence of ints >= 0 (``None`` too when ``optional``), as a tuple."""

    def check(v: Any) -> tuple[int, ...] | None:
        if v is None and optional:
            return None
        if not _is_seq(v) or not v:
            raise _Bad(f"must be a non-empty list of ints >= 0{' or None' if optional else ''}")
        out = tuple(_int()(x) for x in v)
        if unique and len(set(out)) != len(out):
            raise _Bad("must not repeat an entry")
        return out

    return check


def _pos_spec(v: Any) -> PosSpec:
    if v is None or _is_int(v):
        return v if v is None else _int()(v)
    if not _is_seq(v):
        raise _Bad("must be an int >= 0, a list of them, or None")
    return _ints()(v)


def _neurons(v: Any) -> tuple[tuple[int, int], ...]:
    if not _is_seq(v) or not v or not all(_is_seq(n) and len(n) == 2 for n in v):
        raise _Bad("must be a non-empty list of (layer, neuron) pairs")
    return tuple((_int()(layer), _int()(n)) for layer, n in v)


def _nested(v: Any, depth: int) -> Any:
    if depth == 0:
        return _real()(v)
    if not _is_seq(v) or not v:
        raise _Bad("must be a non-empty nested list of finite numbers")
    return [_nested(x, depth - 1) for x in v]


def _word_or_numbers(words: tuple[str, ...], depth: int, shape: str) -> Check:
    def check(v: Any) -> Any:
        if isinstance(v, str):
            return _choice(*words)(v)
        try:
            out = _nested(v, depth)
        except _Bad as e:
            raise _Bad(f"must be {' or '.join(repr(w) for w in words)} or a {shape} list of finite numbers") from e
        try:
            torch.tensor(out)
        except ValueError as e:  # ragged
            raise _Bad(f"must be a rectangular {shape} list") from e
        return out

    return check


LAYERS = _ints(optional=True, unique=True)
STRENGTH = _real(0.0, 1.0)
MODE = _choice("zero", "mean", "value")


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Base class: a typed, serialisable edit of a model's activations."""

    kind: ClassVar[str] = "intervention"
    #: Field checks, one per dataclass field (see :func:`_int` and friends).
    checks: ClassVar[dict[str, Check]] = {}
    #: Whether the edit changes the attention pattern the model uses.
    edits_pattern: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _REGISTRY[cls.kind] = cls

    def __post_init__(self) -> None:
        # Fail at construction, before any model is touched.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self.check_field(f.name, getattr(self, f.name)))

    @classmethod
    def check_field(cls, name: str, value: Any) -> Any:
        """The normalised ``value`` of field ``name``; one-line ``ValueError`` naming it if bad."""
        check = cls.checks.get(name)
        if check is None:
            return value
        try:
            return check(value)
        except _Bad as e:
            raise ValueError(f"{cls.__name__}: {name}={_short(value)} {e}") from None

    def pattern_problem(self, readout: "PatternReadout") -> str | None:
        """Why ``hook_pattern`` would not show the pattern the model used under this spec, or ``None``."""
        return None

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


def from_dict(d: Any) -> Intervention:  # Any: checked here, with messages a type checker would not give
    """Rebuild an intervention from :meth:`Intervention.to_dict` output.

    Raises:
        ValueError: One line naming the problem: not a dict, an unknown ``kind``, unknown or
            missing fields, or a field of the wrong type or range.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"from_dict expects a dict from Intervention.to_dict(), got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise ValueError(f"unknown intervention kind {_short(kind)}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[kind]
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ValueError(f"{kind} has no field(s) {', '.join(_short(k) for k in unknown)}; its fields: {names}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise ValueError(f"{kind} is missing field(s) {missing}")
    # Checked before the constructor so runtime type checkers (beartype) cannot pre-empt the message.
    return cls(**{k: cls.check_field(k, v) for k, v in d.items()})


def _capture(store: dict[int, Tensor], layer: int) -> HookFn:
    def hook(t: Tensor, hook: Any) -> None:
        store[layer] = t

    return hook


def _probe_cache_key(model: ModelLike) -> tuple:
    # Compatibility mode and weight processing may swap the attention implementation.
    return (bool(getattr(model, "compatibility_mode", False)), bool(getattr(model, "_weights_processed", False)))


def pattern_edits_apply(model: ModelLike) -> bool:
    """Whether edits to ``hook_pattern`` change the model's output (measured once, cached)."""
    key = _probe_cache_key(model)
    cached = _PATTERN_EDITABLE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
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
    with torch.no_grad(), warnings.catch_warnings(), suspended_hooks(model), hooked(model, [("blocks.0.attn.hook_z", grab)]):
        warnings.simplefilter("ignore", UserWarning)
        model(tokens.to(device), return_type=None)
        plain = seen["z"]
        with hooked(model, [("blocks.0.attn.hook_pattern", edit)]):
            model(tokens.to(device), return_type=None)
    editable = not torch.equal(plain, seen["z"])
    _PATTERN_EDITABLE[model] = (key, editable)
    return editable


@dataclass(frozen=True)
class PatternReadout:
    """How a pattern edit reaches readers of ``hook_pattern`` on one model (see :func:`pattern_readout`).

    Attributes:
        mode: ``"applied"`` (the bridge computes attention from the edited ``hook_pattern``) or
            ``"mirrored"`` (it ignores ``hook_pattern`` edits: the edit is made on ``hook_z`` and
            ``hook_pattern`` is rewritten to the pattern that edit amounts to, for readers only).
        verified: The self-check held: under a self-only mask, every layer's ``hook_z`` equalled
            the reported ``hook_pattern`` times ``hook_v``.
        max_err: Largest ``|z - pattern @ v|`` of the self-check, relative to ``max |v|`` (inf
            where it could not be computed).
    """

    mode: Literal["applied", "mirrored"]
    verified: bool
    max_err: float

    def describe(self) -> dict[str, Any]:
        """Plain-dict form for ``result.meta``."""
        how = {
            "applied": "the bridge computes attention from the edited hook_pattern",
            "mirrored": "the bridge ignores hook_pattern edits; the edit is made on hook_z and "
            "hook_pattern is rewritten to the pattern the model used",
        }[self.mode]
        return {"mode": self.mode, "how": how, "self_check": "passed" if self.verified else "failed",
                "self_check_max_err": self.max_err}


def _readout_error(model: ModelLike, info: ModelInfo, mode: str) -> float:
    """Self-check: max relative ``|z - pattern @ v|`` over layers under a self-only mask."""
    n = min(5, info.n_ctx)
    if n < 2:
        return math.inf
    from tl_sinks._compat import model_device

    tokens = (torch.arange(1, n + 1) % info.d_vocab).unsqueeze(0).to(model_device(model))
    spec = SelfOnlyMask(pos=n // 2, strength=0.75)  # a blend: tests the lerp too, not only one-hots
    seen: dict[str, dict[int, Tensor]] = {"v": {}, "pattern": {}, "z": {}}
    grabs = [
        (f"blocks.{layer}.attn.hook_{site}", _capture(seen[site], layer))
        for layer in range(info.n_layers)
        for site in ("v", "pattern", "z")
    ]
    # The mask's hooks first, so the grabs see the edited tensors, as stage readers do.
    hooks = spec.build_hooks(info, "pattern" if mode == "applied" else "mirrored") + grabs
    with torch.no_grad(), suspended_hooks(model), hooked(model, hooks):
        model(tokens, return_type=None)
    if any(len(seen[site]) != info.n_layers for site in seen):
        return math.inf  # a hook that never fired: nothing to compare
    worst = 0.0
    for layer in range(info.n_layers):
        z = as_head_vector(seen["z"][layer], info.n_heads).double()
        v = as_head_vector(seen["v"][layer], info.n_key_value_heads).double()
        v = v.repeat_interleave(info.n_heads_per_kv, dim=2)
        pattern = seen["pattern"][layer].double()
        if pattern.shape != (z.shape[0], z.shape[2], z.shape[1], v.shape[1]):
            return math.inf
        mixed = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        worst = max(worst, float((z - mixed).abs().max() / v.abs().max().clamp_min(1e-6)))
    return worst


def pattern_readout(model: ModelLike, info: ModelInfo | None = None) -> PatternReadout:
    """How pattern edits reach ``hook_pattern`` readers on ``model`` (measured once, cached).

    TransformerLens bridges that run attention themselves apply ``hook_pattern`` edits; those
    that delegate to the HF module (GPT-J, OPT, BERT, RoBERTa in TransformerLens 4.3) fire
    ``hook_pattern`` after the fact and discard edits. There :class:`SelfOnlyMask` edits
    ``hook_z`` and rewrites ``hook_pattern`` for readers. Either way a self-check pass verifies
    that the pattern readers see is the one the model combined the values with.
    """
    key = _probe_cache_key(model)
    cached = _READOUT.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    info = info or inspect_model(model)
    mode: Literal["applied", "mirrored"] = "applied" if pattern_edits_apply(model) else "mirrored"
    err = _readout_error(model, info, mode)
    dtype = getattr(model.cfg, "dtype", torch.float32)
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 1e-7
    readout = PatternReadout(mode=mode, verified=err <= max(1e-5, 16 * eps), max_err=err)
    _READOUT[model] = (key, readout)
    return readout


def check_pattern_readers(
    model: ModelLike, info: ModelInfo, specs: Sequence[Intervention], *, reads_pattern: bool
) -> dict[str, Any] | None:
    """Readout provenance for ``meta`` when ``specs`` edit the pattern; refuse wrong patterns.

    Args:
        model: The model.
        info: Its :class:`~tl_sinks._compat.ModelInfo`.
        specs: The interventions of the run.
        reads_pattern: Whether the run reports statistics read from ``hook_pattern``.

    Returns:
        :meth:`PatternReadout.describe`, or ``None`` when no spec edits the pattern.

    Raises:
        ValueError: If ``reads_pattern`` and ``hook_pattern`` would not show the pattern the
            model used under one of the specs (one line naming the family and the spec).
    """
    editing = [s for s in specs if s.edits_pattern]
    if not editing:
        return None
    readout = pattern_readout(model, info)
    if reads_pattern:
        for s in editing:
            problem = s.pattern_problem(readout)
            if problem:
                raise ValueError(f"{info.architecture}: attention patterns cannot be reported under {s!r}: {problem}")
    return readout.describe()


def _self_only_pattern(p: int, s: float, *, in_place: bool) -> HookFn:
    """Row ``p`` of every head's pattern blended towards the one-hot at key ``p``."""

    def hook(pattern: Tensor, hook: Any) -> Tensor | None:
        _check_pos(p, pattern.shape[-1], "SelfOnlyMask")
        # In place where the bridge has already consumed the tensor and no autograd graph holds
        # it: a returned copy would earn TransformerLens' "edit is discarded" warning, although
        # here the rewrite is meant for readers only.
        report_only = in_place and not pattern.requires_grad
        out = pattern if report_only else pattern.clone()
        onehot = torch.zeros_like(out[:, :, p])
        onehot[..., p] = 1.0
        out[:, :, p] = torch.lerp(out[:, :, p], onehot, s)
        return None if report_only else out

    hook.report_only = in_place  # type: ignore[attr-defined]  # read by intervene()
    return hook


def _self_only_z(p: int, s: float, info: ModelInfo, values: dict[int, Tensor], layer: int) -> HookFn:
    """``z[p]`` blended towards ``v[p]`` (query head ``h`` reads kv head ``h // rep``)."""
    rep = info.n_heads_per_kv

    def hook(z: Tensor, hook: Any) -> Tensor:
        zz = as_head_vector(z, info.n_heads)
        _check_pos(p, zz.shape[1], "SelfOnlyMask")
        v = as_head_vector(values.pop(layer), info.n_key_value_heads)
        target = v[:, p].repeat_interleave(rep, dim=1).to(zz.dtype)
        zz = zz.clone()
        zz[:, p] = torch.lerp(zz[:, p], target, s)
        return zz.reshape(z.shape)

    return hook


@dataclass(frozen=True, kw_only=True)
class SelfOnlyMask(Intervention):
    """Token ``pos`` attends only to itself (the paper's mask intervention).

    The edit ``z[p] = v[p]`` is exactly the pattern whose row ``p`` is one-hot at ``p`` (at
    strength ``s``, the pattern row blended by ``s``), so it can be made on either hook. Where
    the bridge applies ``hook_pattern`` edits the pattern is edited and the model computes
    ``z`` from it; where it ignores them (it delegates attention to the HF module, as for GPT-J,
    OPT, BERT and RoBERTa) ``hook_z`` is edited and ``hook_pattern`` is rewritten to match, for
    readers only. :func:`pattern_readout` checks once per model that ``hook_z`` equals
    ``hook_pattern @ hook_v`` under the edit; where it does not, only ``hook_z`` is edited and
    tl_sinks refuses to report pattern statistics under the mask.

    Attributes:
        pos: The position whose attention is restricted.
        layers: Layers to apply it in (default all).
        strength: 1 = fully self-only; 0 = exact no-op; in between blends the pattern row (and
            so the output) linearly.
        route: ``"auto"`` as above; ``"z"`` edits ``hook_z`` only (``hook_pattern`` then shows
            the unedited pattern); ``"pattern"`` edits ``hook_pattern`` only and raises where
            the bridge discards pattern edits. The two single routes check one another.
    """

    kind: ClassVar[str] = "self_only_mask"
    checks: ClassVar[dict[str, Check]] = {
        "pos": _int(), "layers": LAYERS, "strength": STRENGTH, "route": _choice("auto", "z", "pattern"),
    }
    edits_pattern: ClassVar[bool] = True
    pos: int
    layers: tuple[int, ...] | None = None
    strength: float = 1.0
    route: Literal["auto", "z", "pattern"] = "auto"

    def hooks(self, model: ModelLike, info: ModelInfo, valid: Tensor | None = None) -> list[tuple[str, HookFn]]:
        if self.route == "z":
            return self.build_hooks(info, "z")
        if self.route == "pattern":
            if not pattern_edits_apply(model):
                raise ValueError(f"{info.architecture}'s attention discards hook_pattern edits; use route='z' or 'auto'")
            return self.build_hooks(info, "pattern")
        readout = pattern_readout(model, info)
        if not readout.verified:
            return self.build_hooks(info, "z")  # hook_z is honoured by every bridge
        return self.build_hooks(info, "pattern" if readout.mode == "applied" else "mirrored")

    def build_hooks(self, info: ModelInfo, how: Literal["pattern", "mirrored", "z"]) -> list[tuple[str, HookFn]]:
        """Hooks for one way of making the edit.

        Args:
            info: The model's :class:`~tl_sinks._compat.ModelInfo`.
            how: ``"pattern"``: edit ``hook_pattern`` (the bridge computes ``z`` from it);
                ``"mirrored"``: edit ``hook_z`` and rewrite ``hook_pattern`` in place for
                readers; ``"z"``: edit ``hook_z`` only.
        """
        p, s = self.pos, float(self.strength)
        values: dict[int, Tensor] = {}
        out: list[tuple[str, HookFn]] = []
        for layer in _layers(self.layers, info):
            if how != "pattern":
                out.append((f"blocks.{layer}.attn.hook_v", _capture(values, layer)))
            if how != "z":
                out.append((f"blocks.{layer}.attn.hook_pattern", _self_only_pattern(p, s, in_place=how == "mirrored")))
            if how != "pattern":
                out.append((f"blocks.{layer}.attn.hook_z", _self_only_z(p, s, info, values, layer)))
        return out

    def pattern_problem(self, readout: PatternReadout) -> str | None:
        if self.strength == 0.0:
            return None  # an exact no-op: the reported pattern is the one used
        if self.route == "z":
            return "route='z' edits hook_z only, so hook_pattern would show attention the model did not use; use route='auto'"
        if not readout.verified:
            verb = "applies" if readout.mode == "applied" else "discards"
            return (f"the bridge {verb} hook_pattern edits, and its self-check failed (hook_z differs from "
                    f"hook_pattern @ hook_v by {readout.max_err:.2g} of max |v|), so the reported pattern is not the one used")
        return None


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
    checks: ClassVar[dict[str, Check]] = {
        "pos": _int(), "lam": _real(), "layers": LAYERS,
        "mu": _word_or_numbers(("positions",), 3, "[layer][head_index][d_head]"),
    }
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
    checks: ClassVar[dict[str, Check]] = {"pos": _int(), "lam": _real(), "layers": LAYERS}
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
    checks: ClassVar[dict[str, Check]] = {
        "neurons": _neurons, "pos": _pos_spec, "mode": MODE, "value": _real(), "strength": STRENGTH,
    }
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
    checks: ClassVar[dict[str, Check]] = {
        "dims": _ints(), "layers": LAYERS, "pos": _pos_spec, "mode": MODE, "value": _real(), "strength": STRENGTH,
    }
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
    checks: ClassVar[dict[str, Check]] = {
        "layers": LAYERS, "gain": _word_or_numbers(("batch_rms", "ones"), 2, "[layer][head_index]"), "eps": _real(0.0),
    }
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
    model: ModelLike,
    specs: Intervention | Sequence[Intervention],
    valid: Tensor | None = None,
    info: ModelInfo | None = None,
) -> list[tuple[str, HookFn]]:
    """All forward hooks of ``specs`` (a sequence of interventions, or one), in order.

    Example:
        >>> intervention_hooks(model, SelfOnlyMask(pos=3))        # doctest: +SKIP
        >>> intervention_hooks(model, [SelfOnlyMask(pos=3), ScaleOutput(pos=3, lam=2.0)])  # doctest: +SKIP
    """
    info = info or inspect_model(model)
    if isinstance(specs, Intervention):
        specs = [specs]
    elif not hasattr(specs, "__iter__"):
        raise TypeError(f"{specs!r} is not a tl_sinks intervention or a sequence of them")
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

    Hooks you add inside the block run after the interventions' and see their edits: under
    :class:`SelfOnlyMask` (``route="auto"``) ``hook_pattern`` shows the pattern the model used
    on every bridge whose :func:`pattern_readout` self-check passed. tl_sinks' own runners
    (:func:`tl_sinks.scan`) refuse pattern statistics where it did not, or under ``route="z"``.
    """
    valid = None if attention_mask is None else attention_mask.bool()
    hooks = intervention_hooks(model, specs, valid)
    with warnings.catch_warnings():
        if any(getattr(fn, "report_only", False) for _, fn in hooks):
            # A pattern rewritten for readers only: TransformerLens warns (under autograd, where
            # it gets a copy) that the model ignores it, which is the intent here.
            warnings.filterwarnings("ignore", message=_DISCARDED_PATTERN_EDIT, category=UserWarning)
        with hooked(model, hooks):
            yield model


__all__: Sequence[str] = [
    "AblateNeurons",
    "AblateResidDims",
    "AmplifyDeviation",
    "HeadRMSNorm",
    "Intervention",
    "PatternReadout",
    "ScaleOutput",
    "SelfOnlyMask",
    "check_pattern_readers",
    "from_dict",
    "intervene",
    "intervention_hooks",
    "pattern_edits_apply",
    "pattern_readout",
]
