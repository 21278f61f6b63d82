"""Result objects shared by every stage.

Every stage returns a :class:`SinkResult`: a tensor with named dims (the same axis words as the
jaxtyping annotations, e.g. ``layer head_index key_pos``), optional tick labels per dim, and
provenance in ``meta`` (model name, TransformerLens version, weight processing, ``prepend_bos``,
whether attention is causal). Results turn into tidy pandas DataFrames with :meth:`to_frame`
and show as a short table in Jupyter (``_repr_html_``, no JavaScript, no network).

Stage results subclass it and add the extra tensors they need (counts, baselines, per-finding
tables) plus methods that derive the headline numbers (``sink_rate``, ``first_rest_ratio``, ...).

**Printing.** ``repr(result)`` is short whatever the sizes: the class, the dims and their sizes,
the value range, the headline numbers and the shapes of the other fields, never a tensor's
elements. Every subclass gets it (a dataclass subclass would otherwise generate a ``__repr__``
that prints every tensor): :meth:`SinkResult.__init_subclass__` puts the compact ``__repr__``
in the subclass before ``@dataclass`` runs, and ``@dataclass`` keeps a ``__repr__`` the class
already has.

**Saving.** ``result.save(path)`` writes one ``.safetensors`` file: every tensor (also tensors
nested in DataFrames' numeric columns and in nested results, e.g. the four stages of a
``ScanResult``) is a safetensors entry, and the rest (dims, coords, meta, DataFrames' other
columns and dtypes, scalars, which class it is) is JSON in the file's safetensors header
(``__metadata__["content"]``). ``ResultClass.load(path)`` or :func:`load_result` reads it back:
no pickle and no ``eval``; the class comes from a fixed registry of result classes, named in
the file. The write is atomic (:mod:`tl_sinks._io`). Any class that subclasses
:class:`SavableResult` and is a dataclass whose fields are tensors, DataFrames, plain Python
values (``None``, bool, int, float, str, list, tuple, dict, set), NumPy arrays or other savable
results can be saved the same way (``ChainTrace`` would need only to subclass it).

Example:
    >>> r = SinkResult(values=torch.tensor([[1.0, -5.0], [3.0, 2.0]]), dims=("layer", "head_index"), value_name="v")
    >>> r
    SinkResult[layer=2, head_index=2] v in [-5, 3]
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

R = TypeVar("R", bound="SinkResult")
S = TypeVar("S", bound="SavableResult")

FORMAT = "tl_sinks.result"
FORMAT_VERSION = 1
# Result classes load_result may import on demand: class name -> the module defining it. The
# module comes from this table, never from the file.
KNOWN_RESULT_MODULES: dict[str, str] = {
    "SinkResult": "tl_sinks.results",
    "SinkScores": "tl_sinks.sinks",
    "ValueAggregation": "tl_sinks.aggregation",
    "SuperNeurons": "tl_sinks.super_neurons",
    "WeightSuperNeurons": "tl_sinks.super_neurons",
    "DimensionDisparity": "tl_sinks.disparity",
    "PatchingResult": "tl_sinks.patching",
    "ScanResult": "tl_sinks.scan",
    "ChainTrace": "tl_sinks.trace",
}
_REGISTRY: dict[str, type] = {}
_REPR_LINE = 200  # characters per repr line at most
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class ResultFileError(ValueError):
    """A result file that cannot be read or written; the one-line message names the file."""


# --------------------------------------------------------------------------- save / load
class SavableResult:
    """Mixin: ``save(path)`` / ``load(path)`` for result dataclasses (see the module docstring).

    Subclasses are registered by class name when they are defined, so :func:`load_result` can
    rebuild them; the first class registered under a name keeps it.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY.setdefault(cls.__name__, cls)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to ``path`` (one ``.safetensors`` file; atomic).

        Returns:
            ``path``.

        Raises:
            ResultFileError: A field holds a value that cannot be saved (named in the message),
                or the file cannot be written.
        """
        return save_result(self, path)

    @classmethod
    def load(cls: type[S], path: str | os.PathLike[str]) -> S:
        """Read a result written by :meth:`save`; it must be a ``cls`` (or a subclass).

        Raises:
            ResultFileError: Missing or unreadable file, not a tl_sinks result, an unknown class,
                a result of another class, or content that does not describe a valid ``cls``.
        """
        obj = load_result(path)
        if not isinstance(obj, cls):
            raise ResultFileError(f"{path}: holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj


def _tl_sinks_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tl_sinks")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def save_result(result: Any, path: str | os.PathLike[str]) -> Path:
    """Write a :class:`SavableResult` to one ``.safetensors`` file, atomically."""
    from safetensors.torch import save as st_save

    from tl_sinks._io import atomic_write_bytes

    if not isinstance(result, SavableResult) or not dataclasses.is_dataclass(result):
        raise TypeError(f"{type(result).__name__} is not a savable tl_sinks result")
    writer = _Writer()
    try:
        content = writer.encode(result, type(result).__name__)
        text = json.dumps(content, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ResultFileError(f"{path}: cannot save this {type(result).__name__}: {_one_line(e)}") from e
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "class": type(result).__name__,
        "tl_sinks_version": _tl_sinks_version(),
        "content": text,
    }
    try:
        data = st_save(writer.tensors, metadata=header)
    except Exception as e:  # safetensors refusing a tensor (dtype, layout)
        raise ResultFileError(f"{path}: cannot save this {type(result).__name__}: {_one_line(e)}") from e
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ResultFileError(f"{path}: could not write the result ({e.strerror or e})") from e
    return Path(path)


def load_result(path: str | os.PathLike[str]) -> Any:
    """Read any tl_sinks result written by ``result.save(path)``, whatever its class.

    The class is the one named in the file, looked up among tl_sinks' result classes (and any
    :class:`SavableResult` subclass defined in this session). Nothing is unpickled or evaluated.

    Raises:
        ResultFileError: (a ``ValueError``, one line naming the file) for a missing or
            unreadable file, a file that is not a tl_sinks result, a format version newer than
            this tl_sinks, an unknown class, or tampered/corrupt content.
    """
    p = Path(path)
    if not p.exists():
        raise ResultFileError(f"{path}: no such file")
    if p.is_dir():
        raise ResultFileError(f"{path}: is a directory, not a result file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ResultFileError(f"{path}: could not read the file ({e.strerror or e})") from e
    header = _read_header(data, path)
    version = header.get("format_version")
    if not (isinstance(version, str) and version.isdigit()):
        raise ResultFileError(f"{path}: corrupt tl_sinks result header (format_version {version!r})")
    if int(version) > FORMAT_VERSION:
        raise ResultFileError(
            f"{path}: written in result format {version} by tl_sinks {header.get('tl_sinks_version')}; "
            f"this tl_sinks reads format {FORMAT_VERSION} at most (upgrade tl_sinks)"
        )
    try:
        content = json.loads(header.get("content", ""), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ResultFileError(f"{path}: corrupt JSON in the result header ({_one_line(e)})") from None
    if not isinstance(content, dict) or content.get("$t") != "result" or content.get("class") != header.get("class"):
        found = content.get("class") if isinstance(content, dict) else type(content).__name__
        raise ResultFileError(f"{path}: the header names class {header.get('class')!r} but the content holds {found!r}")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ResultFileError(f"{path}: corrupt tensor data ({_one_line(e)})") from None
    try:
        obj = _Reader(tensors).decode(content, "")
    except ResultFileError:
        raise
    except _Bad as e:
        raise ResultFileError(f"{path}: {e}") from None
    except Exception as e:  # a class refusing the fields (__post_init__), bad dtypes, ...
        raise ResultFileError(f"{path}: invalid result content ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(obj, SavableResult) or type(obj).__name__ != header.get("class"):
        raise ResultFileError(f"{path}: the header names class {header.get('class')!r} but the content holds "
                              f"{type(obj).__name__}")
    return obj


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:300] + ("..." if len(s) > 300 else "")


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _read_header(data: bytes, path: Any) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file, checked to be a tl_sinks result header."""
    not_ours = f"{path}: not a tl_sinks result file"
    if len(data) < 8:
        raise ResultFileError(f"{not_ours} (too short to be a safetensors file)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER):
        raise ResultFileError(f"{not_ours} (no safetensors header)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ResultFileError(f"{not_ours} (its safetensors header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ResultFileError(f"{not_ours} (its safetensors header has no format={FORMAT!r})")
    return meta


def _lookup_class(name: Any) -> type:
    if not isinstance(name, str):
        raise _Bad(f"invalid class name {name!r}")
    if name not in _REGISTRY and name in KNOWN_RESULT_MODULES:
        importlib.import_module(KNOWN_RESULT_MODULES[name])  # a fixed table, never a module named by the file
    cls = _REGISTRY.get(name)
    if cls is None:
        known = sorted(set(_REGISTRY) | set(KNOWN_RESULT_MODULES))
        raise _Bad(f"unknown result class {name!r} (tl_sinks knows {', '.join(known)})")
    return cls


class _Bad(Exception):
    """Content that does not decode (the message says where)."""


# Dtypes stored as safetensors entries when they are a DataFrame column or a NumPy array.
_TENSOR_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"}


class _Writer:
    """Turns a result into JSON-able content plus a dict of tensors (``self.tensors``)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def _tensor(self, t: Tensor, path: str) -> str:
        key, i = path, 1
        while key in self.tensors:
            i += 1
            key = f"{path}#{i}"
        self.tensors[key] = t.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return key

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"$t": "float", "v": repr(float(obj))}
        if obj is pd.NA:
            return {"$t": "NA"}
        if isinstance(obj, np.generic):
            return self.encode(obj.item(), path)
        if isinstance(obj, Tensor):
            return {"$t": "tensor", "key": self._tensor(obj, path)}
        if isinstance(obj, np.ndarray):
            if str(obj.dtype) not in _TENSOR_DTYPES:
                raise TypeError(f"{path}: NumPy arrays of dtype {obj.dtype} are not supported")
            return {"$t": "ndarray", "key": self._tensor(torch.from_numpy(np.array(obj, copy=True)), path)}
        if isinstance(obj, pd.DataFrame):
            return self._frame(obj, path)
        if isinstance(obj, SavableResult) and dataclasses.is_dataclass(obj):
            fields = {f.name: self.encode(getattr(obj, f.name), f"{path}.{f.name}") for f in dataclasses.fields(obj)}
            return {"$t": "result", "class": type(obj).__name__, "fields": fields}
        if isinstance(obj, tuple):
            return {"$t": "tuple", "items": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj) and "$t" not in obj:
                return {k: self.encode(v, f"{path}.{k}") for k, v in obj.items()}
            return {"$t": "dict", "items": [[self.encode(k, f"{path}.<key>"), self.encode(v, f"{path}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (set, frozenset)):
            return {"$t": type(obj).__name__, "items": [self.encode(v, f"{path}.<item>") for v in obj]}
        raise TypeError(f"{path} is a {type(obj).__name__}, which tl_sinks results cannot save")

    def _values(self, values: Any, dtype: Any, path: str) -> dict[str, Any]:
        """A column (or index level): a safetensors entry for plain NumPy dtypes, JSON otherwise."""
        name = str(dtype)
        if isinstance(dtype, np.dtype) and name in _TENSOR_DTYPES:
            arr = np.array(values, dtype=dtype, copy=True)  # writable and contiguous, for torch
            return {"dtype": name, "key": self._tensor(torch.from_numpy(arr), path)}
        items = [None if v is None else v for v in list(values)]
        return {"dtype": name, "values": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(items)]}

    def _index(self, idx: pd.Index, path: str) -> dict[str, Any]:
        if isinstance(idx, pd.RangeIndex):
            return {"kind": "range", "start": idx.start, "stop": idx.stop, "step": idx.step, "name": self.encode(idx.name, path)}
        if isinstance(idx, pd.MultiIndex):
            levels = [self._values(idx.get_level_values(i), idx.levels[i].dtype, f"{path}.level{i}") for i in range(idx.nlevels)]
            return {"kind": "multi", "levels": levels, "names": [self.encode(n, path) for n in idx.names]}
        return {"kind": "index", "values": self._values(idx, idx.dtype, path), "name": self.encode(idx.name, path)}

    def _frame(self, df: pd.DataFrame, path: str) -> dict[str, Any]:
        cols = [self._values(df.iloc[:, i], df.dtypes.iloc[i], f"{path}.{df.columns[i]}") for i in range(df.shape[1])]
        return {
            "$t": "frame",
            "n_rows": int(df.shape[0]),
            "columns": self._index(df.columns, f"{path}.<columns>"),
            "data": cols,
            "index": self._index(df.index, f"{path}.<index>"),
        }


class _Reader:
    """Rebuilds objects from decoded JSON content and the file's tensors."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = tensors

    def _tensor(self, key: Any, path: str) -> Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise _Bad(f"{path or 'content'} refers to tensor {key!r}, which the file does not hold")
        return self.tensors[key]

    def decode(self, j: Any, path: str) -> Any:
        if j is None or isinstance(j, (bool, int, float, str)):
            return j
        if isinstance(j, list):
            return [self.decode(v, f"{path}[{i}]") for i, v in enumerate(j)]
        if not isinstance(j, dict):
            raise _Bad(f"{path}: unexpected JSON {type(j).__name__}")
        tag = j.get("$t")
        if tag is None:
            return {k: self.decode(v, f"{path}.{k}") for k, v in j.items()}
        if tag == "tuple":
            return tuple(self.decode(v, f"{path}[{i}]") for i, v in enumerate(self._list(j, "items", path)))
        if tag in ("set", "frozenset"):
            items = [self.decode(v, path) for v in self._list(j, "items", path)]
            return set(items) if tag == "set" else frozenset(items)
        if tag == "dict":
            out = {}
            for pair in self._list(j, "items", path):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise _Bad(f"{path}: a dict item is not a [key, value] pair")
                out[self.decode(pair[0], path)] = self.decode(pair[1], path)
            return out
        if tag == "float":
            v = j.get("v")
            if v not in ("nan", "inf", "-inf"):
                raise _Bad(f"{path}: invalid float {v!r}")
            return float(v)
        if tag == "NA":
            return pd.NA
        if tag == "tensor":
            return self._tensor(j.get("key"), path)
        if tag == "ndarray":
            return self._tensor(j.get("key"), path).numpy().copy()
        if tag == "frame":
            return self._frame(j, path)
        if tag == "result":
            return self._result(j, path)
        raise _Bad(f"{path}: unknown content tag {tag!r}")

    @staticmethod
    def _list(j: dict[str, Any], key: str, path: str) -> list[Any]:
        v = j.get(key)
        if not isinstance(v, list):
            raise _Bad(f"{path}: {key!r} is not a list")
        return v

    def _result(self, j: dict[str, Any], path: str) -> Any:
        cls = _lookup_class(j.get("class"))
        where = path or cls.__name__
        fields_json = j.get("fields")
        if not isinstance(fields_json, dict):
            raise _Bad(f"{where}: the result has no fields")
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = set(fields_json) - set(known)
        if unknown:
            raise _Bad(f"{where} ({cls.__name__}) has no field(s) {sorted(unknown)}")
        kwargs = {name: self.decode(v, f"{where}.{name}") for name, v in fields_json.items()}
        for name, value in kwargs.items():  # annotations are strings (postponed evaluation)
            want = str(known[name].type)
            if want == "Tensor" and not isinstance(value, Tensor):
                raise _Bad(f"{where}.{name} must be a tensor, got {type(value).__name__}")
            if want == "pd.DataFrame" and not isinstance(value, pd.DataFrame):
                raise _Bad(f"{where}.{name} must be a DataFrame, got {type(value).__name__}")
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise _Bad(f"{where}: {cls.__name__} refuses these fields ({_one_line(e)})") from None

    def _values(self, spec: Any, n: int | None, path: str) -> Any:
        if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
            raise _Bad(f"{path}: invalid column")
        dtype = spec["dtype"]
        if "key" in spec:
            arr = self._tensor(spec["key"], path).numpy().copy()
            if str(arr.dtype) != dtype or arr.ndim != 1:
                raise _Bad(f"{path}: column data is {arr.dtype} {list(arr.shape)}, header says {dtype}")
            values: Any = arr
        else:
            values = [self.decode(v, path) for v in self._list(spec, "values", path)]
        if n is not None and len(values) != n:
            raise _Bad(f"{path}: {len(values)} values, expected {n}")
        if isinstance(values, np.ndarray):
            return values
        if dtype == "object":  # element by element: a list of lists must stay a column of lists
            arr = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                arr[i] = v
            return arr
        try:
            pd_dtype = pd.api.types.pandas_dtype(dtype)
        except TypeError:
            raise _Bad(f"{path}: unknown dtype {dtype!r}") from None
        return pd.array(values, dtype=pd_dtype)

    def _index(self, spec: Any, n: int | None, path: str) -> pd.Index:
        if not isinstance(spec, dict):
            raise _Bad(f"{path}: invalid index")
        kind = spec.get("kind")
        if kind == "range":
            start, stop, step = spec.get("start"), spec.get("stop"), spec.get("step")
            if not all(type(v) is int for v in (start, stop, step)) or step == 0:
                raise _Bad(f"{path}: invalid range index")
            idx: pd.Index = pd.RangeIndex(start, stop, step, name=self.decode(spec.get("name"), path))
        elif kind == "multi":
            levels = [self._values(s, n, path) for s in self._list(spec, "levels", path)]
            names = [self.decode(x, path) for x in self._list(spec, "names", path)]
            idx = pd.MultiIndex.from_arrays(levels, names=names)
        elif kind == "index":
            idx = pd.Index(self._values(spec.get("values"), n, path), name=self.decode(spec.get("name"), path))
        else:
            raise _Bad(f"{path}: unknown index kind {kind!r}")
        if n is not None and len(idx) != n:
            raise _Bad(f"{path}: index of length {len(idx)}, expected {n}")
        return idx

    def _frame(self, j: dict[str, Any], path: str) -> pd.DataFrame:
        n = j.get("n_rows")
        if type(n) is not int or n < 0:
            raise _Bad(f"{path}: invalid row count {n!r}")
        data = self._list(j, "data", path)
        columns = self._index(j.get("columns"), len(data), f"{path}.<columns>")
        index = self._index(j.get("index"), n, f"{path}.<index>")
        cols = [self._values(spec, n, f"{path}.{columns[i]}") for i, spec in enumerate(data)]
        df = pd.DataFrame({i: pd.Series(c, index=index, copy=False) for i, c in enumerate(cols)}, index=index)
        df.columns = columns
        return df


# --------------------------------------------------------------------------- display helpers
def _clip(s: str, n: int = _REPR_LINE) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def describe_value(name: str, v: Any) -> str | None:
    """A few words for one field in a compact repr: shape for tensors, size for tables."""
    if isinstance(v, Tensor):
        return f"{name}{list(v.shape)}"
    if isinstance(v, pd.DataFrame):
        return f"{name}: DataFrame[{v.shape[0]} rows x {v.shape[1]} cols]"
    if isinstance(v, np.ndarray):
        return f"{name}: ndarray{list(v.shape)}"
    if isinstance(v, (bool, int, float)) or v is None:
        return f"{name}={v:.4g}" if isinstance(v, float) else f"{name}={v}"
    if isinstance(v, str):
        return f"{name}={_clip(repr(v), 40)}"
    if isinstance(v, (list, tuple, Mapping, set, frozenset)):
        return f"{name}: {type(v).__name__}({len(v)})"
    if isinstance(v, SinkResult):
        return f"{name}: {type(v).__name__}{v._dims_str()}"
    return f"{name}: {type(v).__name__}"


def _meta_str(meta: Mapping[str, Any]) -> str:
    keys = ("model_name", "n_prompts", "n_tokens", "site")
    return ", ".join(f"{k}={_clip(str(meta[k]), 60)}" for k in keys if k in meta and meta[k] not in (None, ""))


# --------------------------------------------------------------------------- the base result
@dataclass(frozen=True, kw_only=True)
class SinkResult(SavableResult):
    """A tensor with named dims, optional tick labels, and provenance.

    Attributes:
        values: The main tensor of the result.
        dims: One name per axis of ``values`` (``layer``, ``head_index``, ``pos``, ...).
        value_name: Column name of ``values`` in :meth:`to_frame`.
        coords: Optional tick labels per dim, e.g. ``{"key_pos": str_tokens}``.
        meta: Provenance: model, TransformerLens version, weight processing, settings.
    """

    values: Tensor
    dims: tuple[str, ...]
    value_name: str
    coords: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # ``@dataclass`` (repr=True) generates a __repr__ printing every field unless the class
        # already defines one; this runs before the decorator, so subclasses keep the compact one.
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = SinkResult.__repr__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        if len(self.dims) != self.values.ndim:
            raise ValueError(f"dims={self.dims} but values.ndim={self.values.ndim}")
        for d, ticks in self.coords.items():
            if d not in self.dims:
                raise ValueError(f"coords given for unknown dim {d!r}; dims are {self.dims}")
            n = self.values.shape[self.dims.index(d)]
            if len(ticks) != n:
                raise ValueError(f"coords[{d!r}] has {len(ticks)} labels, axis has {n}")

    # ------------------------------------------------------------------ pandas
    def to_frame(self) -> pd.DataFrame:
        """Tidy DataFrame: one row per element of ``values``.

        Columns are the dims (integer indices), ``<dim>_label`` for dims with coords, and
        ``value_name``.
        """
        return _tensor_to_frame(self.values, self.dims, self.value_name, self.coords)

    def top(self, k: int = 10, *, by_abs: bool = False) -> pd.DataFrame:
        """The ``k`` largest elements as rows of :meth:`to_frame` (NaNs last)."""
        df = self.to_frame()
        key = df[self.value_name].abs() if by_abs else df[self.value_name]
        order = key.sort_values(ascending=False, na_position="last").index
        return df.loc[order[:k]].reset_index(drop=True)

    # ------------------------------------------------------------------ tensors
    def to(self: R, device: str | torch.device) -> R:
        """Copy with every tensor field moved to ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ display
    def _dims_str(self) -> str:
        return "[" + ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.values.shape)) + "]"

    def _range_str(self) -> str:
        v = self.values.detach().float()
        finite = v[torch.isfinite(v)]
        if finite.numel() == 0:
            return "no finite values"
        return f"{self.value_name} in [{finite.min().item():.4g}, {finite.max().item():.4g}]"

    def _field_strs(self) -> list[str]:
        base = {"values", "dims", "value_name", "coords", "meta"}
        out = [describe_value(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in base]
        if self.coords:
            out.append("coords: " + ", ".join(f"{d}({len(t)} labels)" for d, t in self.coords.items()))
        return [s for s in out if s]

    def __repr__(self) -> str:
        """Class, dims and sizes, value range; headline numbers and other fields' shapes (never elements)."""
        lines = [f"{type(self).__name__}{self._dims_str()} {self._range_str()}"]
        try:
            summary = self._summary_lines()
        except Exception as e:  # a repr must not raise (e.g. an empty result)
            summary = [f"(no summary: {type(e).__name__})"]
        lines += [f"  {_clip(s)}" for s in summary[:6]]
        fields = self._field_strs()
        if fields:
            lines.append("  " + _clip("also: " + ", ".join(fields), 3 * _REPR_LINE))
        meta = _meta_str(self.meta)
        if meta and len(lines) > 1:
            lines.append("  " + _clip("meta: " + meta))
        return "\n".join(lines)

    def _summary_lines(self) -> list[str]:
        """Headline lines shown above the table; stages override."""
        return []

    def _repr_html_(self) -> str:
        lines = "".join(f"<li>{html.escape(s)}</li>" for s in self._summary_lines())
        head = f"<b>{html.escape(type(self).__name__)}</b> {html.escape(self._dims_str())}"
        body = f"<ul>{lines}</ul>" if lines else "<br>"
        return head + body + self.top(10).to_html(index=False)


def _tensor_to_frame(
    values: Tensor,
    dims: Sequence[str],
    value_name: str,
    coords: Mapping[str, Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """Long-form DataFrame of a tensor with named dims."""
    idx = pd.MultiIndex.from_product([range(n) for n in values.shape], names=list(dims))
    flat = values.detach().float().cpu().reshape(-1).numpy()
    df = pd.DataFrame({value_name: flat}, index=idx).reset_index()
    for d, ticks in (coords or {}).items():
        df[f"{d}_label"] = df[d].map(dict(enumerate(ticks)))
    return df


def meta_html(meta: Mapping[str, Any]) -> str:
    """A small two-column HTML table of provenance entries."""
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in meta.items()
    )
    return f"<table>{rows}</table>"


__all__: Sequence[str] = [
    "KNOWN_RESULT_MODULES",
    "ResultFileError",
    "SavableResult",
    "SinkResult",
    "describe_value",
    "load_result",
    "meta_html",
    "save_result",
]


def fmt_number(x: Any, digits: int = 3) -> str:
    """A number for a reader: 3 significant digits; below 1e-3 or from 1e4 on as ``1.0e7``.

    Example:
        >>> [fmt_number(v) for v in (10075946.0, 196.2, 13.957, 0.6638, 0.00012, 0, float("nan"))]
        ['1.0e7', '196', '14', '0.664', '1.2e-4', '0', 'n/a']
    """
    if x is None or isinstance(x, bool):
        return "n/a" if x is None else str(x)
    x = float(x)
    if not math.isfinite(x):
        return "n/a" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        mantissa, exp = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{x:.{digits}g}"


def fmt_ratio(x: Any) -> str:
    """``fmt_number(x) + "x"``: ``10075946`` -> ``"1.0e7x"``, ``2.888`` -> ``"2.89x"``."""
    return f"{fmt_number(x)}x"
