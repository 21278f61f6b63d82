"""The package's shape: one-way layers, no import cycles, small functions, data prepared once.

The import graph is read from the source (``ast``), module-level *and* function-level imports
(an import inside a function still makes one module depend on another; hiding it there to dodge
a cycle is what this test refuses), plus the lazy exports of ``tl_sinks/__init__.py``.

Layers, bottom to top (README, "Architecture"). A module may import modules of lower layers;
modules of one layer may import each other only where the layer says so (and never in a cycle):

    entry points   tl_sinks (the lazy facade), cli, train.default_model
    composition    scan -> trace -> report, compare              (scan composes the stages)
    interventions  interventions, patching                        (may read the stages' kernels)
    stages         sinks, aggregation, super_neurons, disparity   (independent of each other)
    driver         _driver                                        (prepare, build, execute)
    hooks          hooks                                          (hook plumbing, accumulator protocol)
    support        _compat, _inputs, results
    base           _types, errors, _io, _progress

Beside the stack: models and tools (loading, models, gguf_export, train.*, viz.*). They may use
base and support; only composition and entry points may import them.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest
import torch

import tl_sinks

PACKAGE = Path(tl_sinks.__file__).parent
MAX_FUNCTION_LINES = 100

# (layer, modules (relative to tl_sinks; "" is the package itself), modules may import each other)
LAYERS: list[tuple[str, set[str], bool]] = [
    ("base", {"_types", "errors", "_io", "_progress"}, False),
    ("support", {"_compat", "_inputs", "results"}, True),
    ("hooks", {"hooks"}, False),
    ("driver", {"_driver"}, False),
    ("stages", {"sinks", "aggregation", "super_neurons", "disparity"}, False),
    ("interventions", {"interventions", "patching"}, False),
    ("composition", {"scan", "trace", "report", "compare"}, True),
    ("entry points", {"", "cli", "train.default_model"}, True),
]
SIDE = ("models and tools", {"loading", "models", "gguf_export", "train", "train.corpus", "train.modeling",
                             "train.trainer", "train.paths", "viz", "viz.figures", "viz.views"})
SIDE_MAY_IMPORT = {"base", "support"}  # and each other, acyclically
SIDE_IMPORTED_BY = {"composition", "entry points"}

# Edges in modules outside this change's remit that break the rules; each must still exist (when
# one is fixed, the test says to drop its entry) and no other edge may break them.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------- the graph
def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(dotted: str) -> str | None:
    """The package module a ``tl_sinks...`` name belongs to (the longest module prefix)."""
    if dotted != "tl_sinks" and not dotted.startswith("tl_sinks."):
        return None
    name = dotted[len("tl_sinks."):] if dotted != "tl_sinks" else ""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> list[tuple[str, int, str | None]]:
    """``(target, line, enclosing function or None)`` for every tl_sinks import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, str | None]] = []

    def visit(node: ast.AST, fn: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn is None else fn
            if isinstance(child, ast.Import):
                found.extend((t, child.lineno, fn) for a in child.names if (t := _resolve(a.name)) is not None)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = package.split(".") if package else []
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(["tl_sinks", *pkg, *([base] if base else [])])
                for a in child.names:
                    t = _resolve(f"{base}.{a.name}")
                    t = t if t and (f"{base}.{a.name}" == "tl_sinks." + t) else _resolve(base)
                    if t is not None:
                        found.append((t, child.lineno, fn))
            visit(child, inner)

    visit(tree, None)
    if module == "":  # the lazy facade depends on what it exports
        found += [(_resolve(m), 0, "__getattr__") for m in tl_sinks._EXPORTS.values()]  # type: ignore[misc]
    return [(t, line, fn) for t, line, fn in found if t != module]


GRAPH: dict[str, dict[str, list[tuple[int, str | None]]]] = {}
for _m, _p in MODULES.items():
    for _t, _line, _fn in _imports(_m, _p):
        GRAPH.setdefault(_m, {}).setdefault(_t, []).append((_line, _fn))


def _label(m: str) -> str:
    return f"tl_sinks.{m}" if m else "tl_sinks"


def _where(a: str, b: str) -> str:
    sites = ", ".join(list(dict.fromkeys(f"line {line}" + (f" in {fn}()" if fn else "") for line, fn in GRAPH[a][b]))[:3])
    return f"{_label(a)} -> {_label(b)} ({MODULES[a].relative_to(PACKAGE.parent)} {sites})"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            strong(v)
    return out


def _layer_of(m: str) -> str:
    for name, mods, _ in LAYERS:
        if m in mods:
            return name
    return SIDE[0] if m in SIDE[1] else "?"


RANK = {name: i for i, (name, _, _) in enumerate(LAYERS)}
INTERNAL = {name: internal for name, _, internal in LAYERS}


def _allowed(a: str, b: str) -> bool:
    la, lb = _layer_of(a), _layer_of(b)
    if la == SIDE[0]:
        return lb in SIDE_MAY_IMPORT or lb == SIDE[0]
    if lb == SIDE[0]:
        return la in SIDE_IMPORTED_BY
    return RANK[lb] < RANK[la] or (la == lb and INTERNAL[la])


# --------------------------------------------------------------------------- tests
def test_every_module_has_a_layer():
    unplaced = [_label(m) for m in MODULES if _layer_of(m) == "?"]
    assert not unplaced, f"put these modules in a layer (tests/test_architecture.py and README 'Architecture'): {unplaced}"


def test_no_import_cycles():
    edges = {a: {b for b in bs if (a, b) not in KNOWN_EXCEPTIONS} for a, bs in GRAPH.items()}
    cycles = _cycles(edges)
    lines = []
    for comp in cycles:
        lines.append(" <-> ".join(_label(m) for m in comp) + ":")
        lines += [f"    {_where(a, b)}" for a in comp for b in edges.get(a, ()) if b in comp]
    assert not cycles, "import cycles (module- or function-level imports):\n" + "\n".join(lines)


def test_layers_point_one_way():
    wrong = [_where(a, b) + f"  [{_layer_of(a)} -> {_layer_of(b)}]"
             for a, bs in GRAPH.items() for b in bs if not _allowed(a, b) and (a, b) not in KNOWN_EXCEPTIONS]
    assert not wrong, "imports against the layering (see the module docstring):\n" + "\n".join(wrong)


def test_stages_depend_only_on_the_layers_below():
    stages = LAYERS[RANK["stages"]][1]
    for m in stages:
        above = [b for b in GRAPH.get(m, {}) if _layer_of(b) not in {"base", "support", "hooks", "driver"}]
        assert not above, f"{_label(m)} imports {[_label(b) for b in above]}"


def test_no_exceptions_to_the_layering():
    # Issue 15's bar: no cycle and no layering break anywhere, so none may be tolerated here.
    assert not KNOWN_EXCEPTIONS, f"layering exceptions crept back in: {sorted(KNOWN_EXCEPTIONS)}"
    assert not _cycles({k: set(v) for k, v in GRAPH.items()}), "the raw import graph has a cycle"


def test_no_function_is_over_100_lines():
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}() has {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def test_the_graph_sees_function_level_imports():
    # The reader itself: report imports trace inside build_report, and the facade its exports.
    assert any(fn == "build_report" for _, fn in GRAPH["report"]["trace"])
    assert "scan" in GRAPH[""] and "loading" in GRAPH[""]


def test_import_tl_sinks_loads_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, tl_sinks; heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'circuitsvis', "
            "'transformer_lens', 'transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_exports_resolve_and_scan_stays_the_function():
    import tl_sinks.scan as _  # noqa: F401  (importing the submodule must not replace the function)

    assert callable(tl_sinks.scan) and tl_sinks.scan.__module__ == "tl_sinks.scan"
    for name in tl_sinks.__all__:
        assert getattr(tl_sinks, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tl_sinks.nope  # noqa: B018


# --------------------------------------------------------------------------- data flows down
class _Counter:
    """Forward passes through the model and prompt preparations, counted with hooks and a wrapper."""

    def __init__(self, model, monkeypatch):
        import tl_sinks._driver as driver

        self.n = collections.Counter()
        self.handle = model.register_forward_hook(lambda *a: self.n.update(["forward"]))
        real = driver.prepare_prompts

        def counting(*a, **k):
            self.n["prepare"] += 1
            return real(*a, **k)

        monkeypatch.setattr(driver, "prepare_prompts", counting)

    def close(self):
        self.handle.remove()


def test_trace_chain_reuses_a_given_scan_and_prepared_prompts(planted_llama, monkeypatch):
    from tests.conftest import random_prompts
    from tl_sinks.scan import prepare_corpus
    from tl_sinks.trace import trace_chain

    prompts = random_prompts([12] * 4, seed=41, low=10)
    kw = dict(pos=5, lambdas=(1.0, 10.0), batch_size=2, progress=False)
    counter = _Counter(planted_llama, monkeypatch)
    try:
        alone = trace_chain(planted_llama, prompts, **kw)
        n_alone = dict(counter.n)
        corpus = prepare_corpus(planted_llama, prompts)
        base = tl_sinks.scan(planted_llama, corpus, batch_size=2, progress=False)
        counter.n.clear()
        given = trace_chain(planted_llama, corpus, base=base, **kw)
        n_given = dict(counter.n)
    finally:
        counter.close()
    # The same numbers, with the base scan handed in and nothing prepared again.
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(given.links, alone.links)
    pd_testing.assert_frame_equal(given.sweep, alone.sweep)
    assert given.meta["base_scan"] == "given" and alone.meta["base_scan"] == "scanned"
    assert n_alone["prepare"] == 1 and "prepare" not in n_given
    # One pass per condition over the 2 batches, whether or not the base scan is given:
    # untouched (the base scan, or only what it lacks, with the loss and the sweep's baseline),
    # ablated (sinks, disparity and loss together), the mask, 2 lambdas x 2 interventions. The
    # first trace may also run the pattern-readout probes (once per model).
    assert n_given["forward"] == 2 * (1 + 1 + 1 + 2 * 2)
    assert n_given["forward"] <= n_alone["forward"] <= n_given["forward"] + 4


def test_trace_chain_refuses_a_scan_of_other_prompts(planted_llama):
    from tests.conftest import random_prompts
    from tl_sinks.trace import trace_chain

    prompts = random_prompts([12] * 4, seed=42, low=10)
    other = tl_sinks.scan(planted_llama, random_prompts([12] * 4, seed=43, low=10), progress=False)
    with pytest.raises(ValueError, match="computed on other tokens"):
        trace_chain(planted_llama, prompts, base=other, pos=5, lambdas=(1.0,), progress=False)
    partial = tl_sinks.scan(planted_llama, prompts, stages=["sinks"], progress=False)
    with pytest.raises(ValueError, match="lacks the disparity stage"):
        trace_chain(planted_llama, prompts, base=partial, pos=5, lambdas=(1.0,), progress=False)
    with pytest.raises(ValueError, match="eps=0.5"):
        trace_chain(planted_llama, prompts, base=tl_sinks.scan(planted_llama, prompts, eps=0.5, progress=False),
                    pos=5, lambdas=(1.0,), progress=False)


def test_prepared_prompts_are_not_prepared_again(planted_llama):
    from tests.conftest import random_prompts
    from tl_sinks.scan import prepare_corpus

    prompts = random_prompts([9, 12, 7], seed=44, low=10)
    corpus = prepare_corpus(planted_llama, prompts)
    a = tl_sinks.scan(planted_llama, prompts, progress=False)
    b = tl_sinks.scan(planted_llama, corpus, progress=False)
    torch.testing.assert_close(a.sinks.values, b.sinks.values, rtol=0, atol=0)
    assert a.meta["corpus_sha256"] == b.meta["corpus_sha256"] == corpus.fingerprint
    with pytest.raises(ValueError, match="already prepared; require_bos"):
        tl_sinks.scan(planted_llama, corpus, require_bos=False, progress=False)


# --------------------------------------------------------------------------- fast paths, verified
# The accumulators skip work that can only add zeros, and avoid a top-k per token; each shortcut
# is checked here against the plain path it replaces (the general path is also what runs on an
# accelerator, where asking whether work can be skipped would sync the host).
def _plain_residual_path(x, valid, k, abs_t, rel_t):
    """What the disparity hook computed before: token_disparity's top-k, then dense scatter-adds."""
    from tl_sinks.disparity import is_massive, token_disparity

    B, P, D = x.shape
    rest = valid.clone()
    rest[:, 0] = False
    first = torch.zeros_like(valid)
    first[:, 0] = True
    s = token_disparity(x, k, max_over=rest)
    massive = is_massive(s["top_values"], s["median"][..., None], abs_threshold=abs_t, rel_threshold=rel_t) & valid[..., None]
    counts = torch.zeros(3, 2, D)
    for c, cls in enumerate((first, rest)):
        m = (cls & valid).reshape(-1).float()
        counts[0, c].scatter_add_(0, s["top_dims"][..., 0].reshape(-1), m)
        mm = (massive & cls[..., None]).reshape(-1).float()
        counts[1, c].scatter_add_(0, s["top_dims"].reshape(-1), mm)
        counts[2, c].scatter_add_(0, s["top_dims"].reshape(-1), mm * s["top_values"].reshape(-1))
    return s, massive.any(-1), counts


def _fast_residual_path(x, valid, k, abs_t, rel_t, padded):
    from tl_sinks.disparity import residual_statistics

    s = residual_statistics(x, valid, padded=padded, k=k, abs_threshold=abs_t, rel_threshold=rel_t)
    counts = torch.zeros(3, 2, x.shape[-1])
    for c in range(2):
        counts[0, c] += s["top_dim_counts"][c]
        counts[1, c] += s["massive_counts"][c]
        if s["massive_events"][c] is not None:
            counts[2, c].scatter_add_(0, *s["massive_events"][c])
    return s, counts


@pytest.mark.parametrize("general_path", [False, True], ids=["cpu-shortcuts", "general"])
def test_residual_statistics_equal_the_top_k_path(monkeypatch, general_path):
    import tl_sinks.disparity as disparity

    if general_path:
        monkeypatch.setattr(disparity, "maybe_any", lambda t: True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, 24, generator=g)
    x[:, 0, 3] = 900.0  # a massive dim at every first token
    x[1, 4, [1, 5, 7, 9, 11, 13]] = torch.tensor([8000.0, 7000, 6500, 6000, 5500, 5000])  # 6 > k massive dims
    x[2, 2, 8] = -5000.0  # a massive dim at a later token
    x[0, 5, 2] = 150.0  # above 100 but not 1000x its token's median: not massive
    for padded in (False, True):
        valid = torch.ones(5, 9, dtype=torch.bool)
        if padded:
            valid[3, 6:] = False
            valid[4, 2:] = False
        ref, ref_tok, ref_counts = _plain_residual_path(x, valid, 4, 100.0, 1000.0)
        s, counts = _fast_residual_path(x, valid, 4, 100.0, 1000.0, padded)
        assert torch.equal(s["top1"], ref["top_values"][..., 0]) and torch.equal(s["median"], ref["median"])
        assert torch.equal(s["rest_mean"], ref["rest_mean"]) and torch.equal(s["abs_sum"], ref["abs_sum"])
        assert torch.equal(s["rest_max"], ref["masked_max"]) and torch.equal(s["massive_token"], ref_tok)
        assert torch.equal(counts, ref_counts)
        assert counts[1, 1].sum() == 4 + 1  # the 6-dim token counts its top 4, plus the later token


def test_cpu_shortcuts_give_the_general_paths_numbers(planted_llama, monkeypatch):
    import tl_sinks.disparity as disparity
    import tl_sinks.super_neurons as super_neurons
    from tests.conftest import random_prompts

    prompts = random_prompts([11, 9, 12, 7, 10], seed=45, low=10)
    kw = dict(stages=["super_neurons", "disparity"], batch_size=2, progress=False)
    fast = tl_sinks.scan(planted_llama, prompts, **kw)
    monkeypatch.setattr(disparity, "maybe_any", lambda t: True)
    monkeypatch.setattr(super_neurons, "selected", lambda mask: torch.arange(mask.shape[0]))
    general = tl_sinks.scan(planted_llama, prompts, **kw)
    for stage in ("super_neurons", "disparity"):
        a, b = getattr(fast, stage), getattr(general, stage)
        for name, value in vars(a).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(b, name)), f"{stage}.{name}"
    assert len(fast.super_neurons.found) and int(fast.disparity.massive_counts.sum()) > 0


def test_exports_are_listed_once():
    assert sorted(tl_sinks.__all__) == sorted([*tl_sinks._EXPORTS, "__version__"])
