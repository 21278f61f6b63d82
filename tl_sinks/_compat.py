"""Backend guards: what kind of model this is, which hooks it has, how its weights were processed.

Every stage asks :func:`inspect_model` instead of reading ``model.cfg`` directly, so the
architecture questions (causal or bidirectional? pre- or post-LayerNorm? gated MLP? GQA?) are
answered once, by measurement where the config cannot be trusted:

* **Norm placement** is probed with a two-token forward pass: in a pre-LN block the first
  LayerNorm reads the residual stream itself (``ln1.hook_in == hook_resid_pre``); in a post-LN
  block (BERT) it reads ``resid_pre + attn_out``.
* **Residual additivity** (``resid_post == resid_pre + attn_out + mlp_out``) is checked on the
  same pass; component attribution of massive activations is only exact where it holds.
* **Widths** ``d_model`` and ``d_mlp`` are read off the hooked tensors on that pass
  (TransformerLens' ``cfg.d_mlp`` is ``4 * d_model`` for every OPT, whatever ``ffn_dim`` says).
* **The attention's input**: ``ln1.hook_out`` in pre-LN blocks; ``attn.hook_in`` (the raw
  residual stream) where there is no norm before attention (OLMo 2).
* **Whether the checkpoint's tokenizer adds BOS**, read from the tokenizer re-read from its own
  files (TransformerLens re-loads it with ``add_bos_token=True``); :mod:`tl_sinks._inputs`
  makes the default ``prepend_bos`` / ``require_bos`` follow it.

Errors are ``ValueError`` / ``NotImplementedError`` with a message that names the problem.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tl_sinks._types import ModelLike
from tl_sinks.errors import NonFiniteActivationError, UnsupportedModelError

# Processing flags recorded by ``load_model`` (exact) for models it loaded.
_PROCESSING: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()
# Probe results per model; keyed on the processing state so a later compat-mode switch re-probes.
_PROBES: "weakref.WeakKeyDictionary[Any, tuple[tuple, dict[str, Any]]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts every stage needs, measured or read once per model.

    Attributes:
        model_name: ``cfg.model_name`` (a hub name or local path).
        architecture: HF architecture class name, e.g. ``LlamaForCausalLM``.
        n_layers, n_heads, n_key_value_heads, d_head, d_model, d_mlp, d_vocab, n_ctx: sizes.
            ``d_model`` and ``d_mlp`` are the widths of the hooked tensors (``hook_resid_pre``,
            ``mlp.hook_post``) on the probe pass, not the config's (wrong for OPT).
        causal: ``True`` for decoder (causal-mask) attention, ``False`` for encoders.
        has_mlp: Whether blocks have MLPs (``False`` for attention-only models).
        gated_mlp: Whether the MLP is gated (Llama ``gate_proj``/``up_proj``).
        post_ln: ``True`` when LayerNorm sits after the residual sum (BERT), measured.
        additive_resid: ``resid_post == resid_pre + attn_out + mlp_out`` held on a probe pass.
        first_token_id: The special token the tokenizer puts at position 0 (BOS, or [CLS] for
            BERT), or ``None`` when unknown.
        pad_token_id: The tokenizer's pad id, or ``None``.
        processing: Weight processing applied to the model (fold_ln, centering, ...).
        tokenizer_adds_bos: Whether the checkpoint's own tokenizer puts a BOS ([CLS]) at position
            0 when it encodes text (``None``: the model has no tokenizer). TransformerLens
            re-loads every tokenizer with ``add_bos_token=True``, so this is measured on the
            tokenizer re-read from its files (see ``tokenizer_check``).
        tokenizer_bos_token_id: The BOS id of the checkpoint's own tokenizer ([CLS] for
            encoders), or ``None`` if it defines none (Qwen; TransformerLens then uses EOS).
        tokenizer_check: How ``tokenizer_adds_bos`` was determined (for ``meta``).
        attn_in: Block-relative hook holding what each attention layer reads: ``ln1.hook_out``
            (pre-LN), ``hook_resid_pre`` (post-LN: the block input is a LayerNorm output), or
            ``attn.hook_in`` for models without a norm before attention (OLMo 2).
        attn_in_is_resid: Whether ``attn.hook_in`` equalled ``hook_resid_pre`` on the probe
            pass (the attention then reads the raw residual stream, not a norm output).
    """

    model_name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_model: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    causal: bool
    has_mlp: bool
    gated_mlp: bool
    post_ln: bool
    additive_resid: bool
    first_token_id: int | None
    pad_token_id: int | None
    processing: dict[str, Any] = field(default_factory=dict)
    tokenizer_adds_bos: bool | None = None
    tokenizer_bos_token_id: int | None = None
    tokenizer_check: str = ""
    attn_in: str = "ln1.hook_out"
    attn_in_is_resid: bool = False

    # Hook sites -----------------------------------------------------------------
    def resid_site(self, layer: int) -> str:
        """Hook holding the un-normalised residual stream after block ``layer``.

        Pre-LN: ``hook_resid_post``. Post-LN (BERT): ``ln2.hook_in``, the raw sum before the
        block's final LayerNorm (TL 4.3's ``hook_resid_post`` there is after the LayerNorm).
        """
        return f"blocks.{layer}.ln2.hook_in" if self.post_ln else f"blocks.{layer}.hook_resid_post"

    def attn_in_site(self, layer: int) -> str:
        """Hook holding the input that block ``layer``'s attention reads.

        Pre-LN: ``ln1.hook_out`` (the paper measures dimension disparity here, after RMSNorm).
        Post-LN: the block input ``hook_resid_pre``, already a LayerNorm output. No norm before
        attention (OLMo 2 normalises the attention and MLP *outputs*): ``attn.hook_in``, the raw
        residual stream.
        """
        return f"blocks.{layer}.{self.attn_in}"

    @property
    def attn_in_site_description(self) -> str:
        """Which hook the "after the attention norm" statistics are read at, in words."""
        if self.attn_in == "ln1.hook_out":
            return "blocks.{L}.ln1.hook_out (output of the pre-attention norm)"
        if self.post_ln:
            return "blocks.{L}.hook_resid_pre (block input, the previous block's LayerNorm output)"
        what = (
            "the raw residual stream (equal to hook_resid_pre on the probe pass)"
            if self.attn_in_is_resid
            else "its input hidden state (it differed from hook_resid_pre on the probe pass)"
        )
        return (
            f"blocks.{{L}}.{self.attn_in} (the attention's input: {self.architecture} has no norm before "
            f"attention, so this is {what}, not a norm output)"
        )

    @property
    def attn_in_is_norm_output(self) -> bool:
        """Whether :meth:`attn_in_site` holds a norm's output (False for OLMo 2-style blocks)."""
        return self.attn_in == "ln1.hook_out" or self.post_ln

    @property
    def attn_in_label(self) -> str:
        """Short phrase for reports: where the attention-input ratio was measured."""
        if self.attn_in == "ln1.hook_out":
            return "after the attention norm"
        if self.post_ln:
            return "at the attention input (post-LN block input)"
        if self.attn_in_is_resid:
            return "at the attention input (raw residual: no norm before attention)"
        return "at the attention input (no norm before attention)"

    @property
    def resid_site_description(self) -> str:
        if self.post_ln:
            return "blocks.{L}.ln2.hook_in (raw residual sum before the post-LN LayerNorm)"
        return "blocks.{L}.hook_resid_post (residual stream after block L)"

    @property
    def n_heads_per_kv(self) -> int:
        return self.n_heads // self.n_key_value_heads

    def describe(self) -> dict[str, Any]:
        """Plain-dict form for ``result.meta``."""
        d = asdict(self)
        d["attention"] = "causal" if self.causal else "bidirectional"
        d["norm_placement"] = "post-LN" if self.post_ln else "pre-LN"
        return d


def _cfg(model: ModelLike, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(model.cfg, n, None)
        if v is not None:
            return v
    return default


def record_processing(model: Any, processing: dict[str, Any]) -> None:
    """Remember the exact weight processing ``load_model`` applied to ``model``."""
    _PROCESSING[model] = dict(processing)


def _param_dtype(model: Any) -> str:
    """The dtype of the model's floating-point parameters now (comma-joined if mixed)."""
    try:
        dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    except (AttributeError, TypeError):
        dtypes = []
    return ", ".join(dtypes) if dtypes else str(_cfg(model, "dtype", default="unknown"))


def describe_processing(model: ModelLike) -> dict[str, Any]:
    """Weight processing applied to ``model``: exact if it came from ``load_model``.

    For other models it is read from the bridge: whether compatibility mode is on and whether
    ``process_weights`` ran (TransformerLens does not record which folds it applied).
    ``"dtype"`` is read from the parameters at call time, so it follows ``model.to(dtype)``.
    """
    if model in _PROCESSING:
        return {**_PROCESSING[model], "dtype": _param_dtype(model)}
    return {
        "source": "inferred from the bridge (not loaded by tl_sinks.load_model)",
        "compatibility_mode": bool(getattr(model, "compatibility_mode", False)),
        "weights_processed": bool(getattr(model, "_weights_processed", False)),
        "dtype": _param_dtype(model),
    }


def _probe(model: ModelLike, n_layers: int, vocab: int) -> dict[str, Any]:
    """Two-token forward pass measuring norm placement, residual additivity and the hooked widths.

    ``d_model`` and ``d_mlp`` are read off the hooked tensors (``hook_resid_pre``, ``mlp.hook_post``):
    TransformerLens' config can be wrong (it says ``4 * d_model`` for every OPT, whatever ``ffn_dim``).
    """
    names = ["blocks.0.hook_resid_pre", "blocks.0.ln1.hook_in", "blocks.0.attn.hook_in", "blocks.0.mlp.hook_post"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{s}" for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    hook_dict = model.hook_dict  # the bridge builds it anew on every access
    present = [n for n in dict.fromkeys(names) if n in hook_dict]
    tokens = (torch.arange(2) % vocab).unsqueeze(0)
    store: dict[str, torch.Tensor] = {}

    def save(t: torch.Tensor, hook: Any) -> None:
        store[hook.name] = t.detach()

    device = _model_device(model)
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, save) for n in present]):
        model(tokens.to(device), return_type=None)
    # TL hook names may come back as aliases; map by the names we asked for.
    got = {n: store.get(hook_dict[n].name, store.get(n)) for n in present}
    for n, t in got.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteActivationError(
                f"NaN or inf activations at {n} on a two-token probe pass: the model's weights "
                "or dtype produce non-finite values, so no statistic would be meaningful."
            )
    out: dict[str, Any] = {"post_ln": False, "additive_resid": False, "attn_in_is_resid": False}
    a, b = got.get("blocks.0.hook_resid_pre"), got.get("blocks.0.ln1.hook_in")
    if a is not None and b is not None:
        out["post_ln"] = not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    c = got.get("blocks.0.attn.hook_in")
    if a is not None and c is not None and c.shape == a.shape:
        out["attn_in_is_resid"] = bool(torch.equal(a, c))
    # Widths as the hooks see them ([batch, pos, width]); None when the hook did not fire.
    out["d_model"] = int(a.shape[-1]) if a is not None else None
    post = got.get("blocks.0.mlp.hook_post")
    out["d_mlp"] = int(post.shape[-1]) if post is not None else None
    additive = True
    for layer in range(n_layers):
        parts = [got.get(f"blocks.{layer}.{s}") for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
        if parts[1] is None or parts[3] is None or parts[0] is None:
            additive = False
            break
        pre, attn, mlp, post = parts
        total = pre + attn + (mlp if mlp is not None else 0)
        scale = post.abs().max().clamp_min(1.0)
        if not torch.allclose(total, post, rtol=1e-4, atol=1e-4 * float(scale)):
            additive = False
            break
    out["additive_resid"] = additive and not out["post_ln"]
    return out


def _model_device(model: ModelLike) -> torch.device:
    dev = _cfg(model, "device")
    if dev is not None:
        return torch.device(dev)
    try:
        return next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def model_device(model: ModelLike) -> torch.device:
    """Device the model's inputs must live on."""
    return _model_device(model)


def _first_token_id(model: ModelLike, causal: bool) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return _cfg(model, "bos_token_id")
    # Ground truth: what the tokenizer actually puts first when asked to prepend BOS.
    try:
        ids = model.to_tokens("a", prepend_bos=True, move_to_device=False, truncate=False)[0]
        special = set(getattr(tok, "all_special_ids", []) or [])
        if len(ids) and int(ids[0]) in special:
            return int(ids[0])
    except Exception:  # a tokenizer that cannot encode "a" falls back to the config ids
        pass
    if not causal and getattr(tok, "cls_token_id", None) is not None:
        return int(tok.cls_token_id)
    return tok.bos_token_id if tok.bos_token_id is not None else _cfg(model, "bos_token_id")


def _leading_bos(tok: Any) -> tuple[bool, list[int]]:
    """Whether ``tok`` puts its BOS ([CLS]) first when it encodes text, and the ids of ``"a"``."""
    leading = {i for i in (getattr(tok, "bos_token_id", None), getattr(tok, "cls_token_id", None)) if i is not None}
    ids = [int(i) for i in tok("a")["input_ids"]]
    plain = [int(i) for i in tok("a", add_special_tokens=False)["input_ids"]]
    return bool(ids) and ids[0] in leading and ids[:1] != plain[:1], ids


def _tokenizer_bos(model: ModelLike) -> dict[str, Any]:
    """Whether the checkpoint's own tokenizer adds a BOS ([CLS]) when encoding text.

    TransformerLens re-loads every tokenizer that has a BOS token with ``add_bos_token=True``
    (``get_tokenizer_with_bos``), so ``model.tokenizer`` adds BOS even where the checkpoint's
    tokenizer does not (Pythia). The answer is therefore read from the tokenizer re-read from its
    own files (``name_or_path``, local files only). Where that fails, TransformerLens' per-family
    ``default_prepend_bos`` decides, applied to the bridge's tokenizer.
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return {"tokenizer_adds_bos": None, "tokenizer_bos_token_id": None,
                "tokenizer_check": "no tokenizer: position 0 is checked against cfg.bos_token_id"}
    name = str(getattr(tok, "name_or_path", "") or "")
    own, why = None, "the tokenizer has no name_or_path"
    if name:
        import warnings

        from transformers import AutoTokenizer

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                own = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:  # no files, remote code, ...: fall back to the bridge's tokenizer
            why = f"re-reading {name} failed ({type(e).__name__})"
    try:
        if own is not None:
            adds, ids = _leading_bos(own)
            bos = ids[0] if adds else getattr(own, "bos_token_id", None)
            return {"tokenizer_adds_bos": adds, "tokenizer_bos_token_id": bos,
                    "tokenizer_check": f"checkpoint tokenizer re-read from {name}: tokenizer('a') = {ids}"}
        adds, ids = _leading_bos(tok)
    except Exception as e:  # a tokenizer that cannot encode "a"
        return {"tokenizer_adds_bos": None, "tokenizer_bos_token_id": None,
                "tokenizer_check": f"the tokenizer cannot encode 'a' ({type(e).__name__}): position 0 is checked against BOS"}
    default = bool(_cfg(model, "default_prepend_bos", default=True))
    return {
        "tokenizer_adds_bos": adds and default,
        "tokenizer_bos_token_id": ids[0] if adds else getattr(tok, "bos_token_id", None),
        "tokenizer_check": f"{why}; bridge tokenizer('a') = {ids}, TransformerLens default_prepend_bos={default}",
    }


def inspect_model(model: ModelLike) -> ModelInfo:
    """Measure and read the architecture facts tl_sinks needs.

    Args:
        model: A TransformerLens ``TransformerBridge`` (from ``load_model`` or booted directly).

    Returns:
        A :class:`ModelInfo`.

    Raises:
        UnsupportedModelError: If the model has no ``blocks.{L}.attn.hook_pattern`` /
            ``hook_z`` hooks (tl_sinks needs per-head attention hooks).
        ValueError: If the model is in training mode (dropout would make every number noisy).
    """
    if not hasattr(model, "cfg") or not hasattr(model, "hook_dict"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a TransformerLens model (no cfg / hook_dict); "
            "load one with tl_sinks.load_model(name_or_path)."
        )
    if getattr(model, "training", False):
        raise ValueError(
            "the model is in training mode (dropout is active, so every statistic would be "
            "noisy); call model.eval() first, or load it with tl_sinks.load_model()."
        )
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    hook_dict = model.hook_dict  # the bridge builds it anew on every access (~0.5 ms): read it once
    arch = str(_cfg(model, "architecture", "original_architecture", default=type(model).__name__))
    missing = [
        n
        for layer in range(n_layers)
        for n in (f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_z")
        if n not in hook_dict
    ]
    if missing:
        raise UnsupportedModelError(
            f"unsupported architecture {arch}: tl_sinks needs per-head attention hooks, "
            f"and this model lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}."
        )
    n_heads = int(cfg.n_heads)
    n_kv = int(_cfg(model, "n_key_value_heads", default=n_heads))
    attn_only = bool(_cfg(model, "attn_only", default=False))
    has_mlp = not attn_only and all(f"blocks.{layer}.mlp.hook_post" in hook_dict for layer in range(n_layers))
    causal = str(_cfg(model, "attention_dir", default="causal")) != "bidirectional"
    processing = describe_processing(model)
    key = (bool(getattr(model, "compatibility_mode", False)), bool(getattr(model, "_weights_processed", False)))
    cached = _PROBES.get(model)
    if cached is None or cached[0] != key:
        probe = _probe(model, n_layers, int(cfg.d_vocab))
        probe["first_token_id"] = _first_token_id(model, causal)
        probe.update(_tokenizer_bos(model))
        _PROBES[model] = (key, probe)
    else:
        probe = cached[1]
    tok = getattr(model, "tokenizer", None)
    # Sized from the hooked tensor: cfg.d_mlp is 4 * d_model for every OPT, whatever ffn_dim says.
    d_mlp = probe.get("d_mlp") or (int(cfg.d_mlp) if cfg.d_mlp is not None else None)
    post_ln = bool(probe["post_ln"])
    if post_ln:
        attn_in = "hook_resid_pre"
    elif all(f"blocks.{layer}.ln1.hook_out" in hook_dict for layer in range(n_layers)):
        attn_in = "ln1.hook_out"
    elif all(f"blocks.{layer}.attn.hook_in" in hook_dict for layer in range(n_layers)):
        attn_in = "attn.hook_in"  # no norm before attention (OLMo 2): what the attention reads
    else:
        attn_in = "ln1.hook_out"  # let the stages name the missing hook
    return ModelInfo(
        model_name=str(_cfg(model, "model_name", default="")),
        architecture=arch,
        n_layers=n_layers,
        n_heads=n_heads,
        n_key_value_heads=n_kv,
        d_head=int(cfg.d_head),
        d_model=int(probe.get("d_model") or cfg.d_model),
        d_mlp=d_mlp if has_mlp else None,
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        causal=causal,
        has_mlp=has_mlp,
        gated_mlp=bool(_cfg(model, "gated_mlp", default=False)) and has_mlp,
        post_ln=post_ln,
        additive_resid=bool(probe["additive_resid"]),
        first_token_id=probe["first_token_id"],
        pad_token_id=None if tok is None else tok.pad_token_id,
        processing=processing,
        tokenizer_adds_bos=probe["tokenizer_adds_bos"],
        tokenizer_bos_token_id=probe["tokenizer_bos_token_id"],
        tokenizer_check=probe["tokenizer_check"],
        attn_in=attn_in,
        attn_in_is_resid=bool(probe["attn_in_is_resid"]) and attn_in == "attn.hook_in",
    )


def require_hooks(model: ModelLike, names: list[str], *, stage: str) -> None:
    """Raise :class:`UnsupportedModelError` naming any hook in ``names`` the model lacks."""
    hook_dict = model.hook_dict  # built anew on every access: once, not once per name
    missing = [n for n in names if n not in hook_dict]
    if missing:
        arch = _cfg(model, "architecture", default=type(model).__name__)
        raise UnsupportedModelError(
            f"the {stage} stage needs hook(s) {missing[:3]} that {arch} does not expose."
        )


def _transformer_lens_version() -> str:
    # TransformerLens 4.x has no __version__; the installed distribution knows its version.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        import transformer_lens

        return str(getattr(transformer_lens, "__version__", "unknown"))


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def base_meta(model: ModelLike, info: ModelInfo) -> dict[str, Any]:
    """Provenance shared by every result's ``meta``."""
    return {
        "model_name": info.model_name,
        "architecture": info.architecture,
        "attention": "causal" if info.causal else "bidirectional",
        "norm_placement": "post-LN" if info.post_ln else "pre-LN",
        "transformer_lens_version": _transformer_lens_version(),
        # The numbers depend on these too (transformers 5.24 changed patching's KV cache).
        "transformers_version": _dist_version("transformers"),
        "torch_version": str(torch.__version__),
        "processing": info.processing,
        "dtype": _param_dtype(model),
    }
