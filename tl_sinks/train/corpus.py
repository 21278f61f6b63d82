"""An English training corpus that every machine with Python already has: docstrings.

The corpus is the docstrings (module, class and function) of the Python standard library, the
language-reference topics that ship with it (``pydoc_data.topics``), and optionally the
docstrings of installed packages (tl_sinks' own dependencies: transformers, torch, numpy,
pandas, ...). It is technical English prose with some code, needs no network, and is
reproducible: documents are read in sorted file order, de-duplicated, and the manifest records
every source's version and the corpus' SHA-256.

Example:
    >>> from tl_sinks.train.corpus import build_corpus
    >>> corpus = build_corpus(packages=())          # doctest: +SKIP
    >>> corpus.manifest["sha256"], len(corpus.documents)   # doctest: +SKIP
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import platform
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PACKAGES = (
    "transformers",
    "torch",
    "numpy",
    "pandas",
    "scipy",
    "sympy",
    "networkx",
    "sklearn",
    "matplotlib",
    "huggingface_hub",
    "datasets",
)
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "site-packages", "__pycache__", "_vendor", "vendored"}
_DIST_NAMES = {"sklearn": "scikit-learn"}


@dataclass(frozen=True)
class Corpus:
    """Documents (strings) and where they came from.

    Attributes:
        documents: The texts, in a fixed order.
        manifest: Sources (name, version, documents, characters), minimum length, SHA-256.
    """

    documents: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)

    def split(self, val_fraction: float = 0.01) -> tuple[list[str], list[str]]:
        """Deterministic train/validation split by a hash of each document."""
        train, val = [], []
        cut = int(val_fraction * 2**32)
        for d in self.documents:
            h = int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:4], "little")
            (val if h < cut else train).append(d)
        return train, val


def _docstrings(root: Path, min_chars: int) -> Iterable[str]:
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(_DIST_NAMES.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_corpus(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    *,
    include_stdlib: bool = True,
    min_chars: int = 80,
    max_documents: int | None = None,
) -> Corpus:
    """Collect the docstring corpus.

    Args:
        packages: Installed packages whose docstrings to include (missing ones are skipped and
            listed in the manifest).
        include_stdlib: Include the standard library's docstrings and ``pydoc_data.topics``.
        min_chars: Shortest docstring kept.
        max_documents: Keep at most this many documents (for quick tests).

    Returns:
        :class:`Corpus`.
    """
    seen: set[str] = set()
    docs: list[str] = []
    sources: list[dict[str, Any]] = []

    def full() -> bool:
        return max_documents is not None and len(docs) >= max_documents

    def add(name: str, version: str, texts: Iterable[str]) -> None:
        n = chars = 0
        for t in texts:
            if full():
                break  # stop reading (quick test corpora need not parse every file)
            if t in seen:
                continue
            seen.add(t)
            docs.append(t)
            n += 1
            chars += len(t)
        sources.append({"name": name, "version": version, "documents": n, "characters": chars})

    if include_stdlib:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        add("python-stdlib", platform.python_version(), _docstrings(stdlib, min_chars))
        from pydoc_data import topics

        add("pydoc_data.topics", platform.python_version(), (topics.topics[k] for k in sorted(topics.topics)))
    missing = []
    for name in packages:
        if full():
            break
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            missing.append(name)
            continue
        add(name, _version(name), _docstrings(Path(spec.origin).parent, min_chars))
    digest = hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()
    manifest = {
        "kind": "docstrings",
        "sources": sources,
        "missing_packages": missing,
        "min_chars": min_chars,
        "max_documents": max_documents,
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "sha256": digest,
    }
    return Corpus(documents=docs, manifest=manifest)
