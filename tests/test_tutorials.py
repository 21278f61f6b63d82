"""The committed tutorials are what a reader sees: executed, with figures, without warnings.

nbmake re-executes every notebook in the suite (``--nbmake`` in pyproject's addopts, ``tutorials``
in its testpaths); these tests read the saved notebooks only, so they take no model time.
Regenerate with ``python tutorials/_make_notebooks.py --execute``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"


def _generator():
    spec = importlib.util.spec_from_file_location("_make_notebooks", TUTORIALS / "_make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()
NAMES = list(GEN.NOTEBOOKS)


def _load(name: str) -> dict:
    return json.loads((TUTORIALS / name).read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _outputs(nb: dict) -> list[dict]:
    return [o for c in _code_cells(nb) for o in c.get("outputs", [])]


def _text(o: dict) -> str:
    parts = [o.get("text", "")] + [o.get("data", {}).get(k, "") for k in ("text/plain", "text/html", "text/markdown")]
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def test_every_tutorial_is_generated():
    assert sorted(NAMES) == sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
    assert NAMES[0] == "00_quickstart.ipynb"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_is_up_to_date_with_its_generator(name):
    saved = [("md:" if c["cell_type"] == "markdown" else "") + "".join(c["source"]) for c in _load(name)["cells"]]
    assert saved == GEN.NOTEBOOKS[name], f"regenerate with `python tutorials/_make_notebooks.py --execute {name[:2]}`"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_is_saved_executed_in_order(name):
    cells = _code_cells(_load(name))
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert all(c.get("outputs") for c in cells), "every code cell shows something"
    assert not [o for o in _outputs(_load(name)) if o["output_type"] == "error"]
    assert not [c["id"] for c in cells if "execution" in c.get("metadata", {})], "no timing metadata"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_has_figures(name):
    pngs = [o for o in _outputs(_load(name)) if "image/png" in o.get("data", {})]
    assert pngs, "a figure cell lost its image (a trailing ';' suppresses a returned figure)"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_outputs_are_clean_and_small(name):
    path = TUTORIALS / name
    assert path.stat().st_size < 1_500_000
    nb = _load(name)
    stderr = [_text(o) for o in _outputs(nb) if o["output_type"] == "stream" and o["name"] == "stderr"]
    assert not stderr, f"warnings or progress bars saved in the outputs: {stderr[:3]}"
    text = "".join(_text(o) for o in _outputs(nb))
    assert "IProgress" not in text and "Warning" not in text
    assert str(ROOT) not in text, "absolute paths of this checkout in the outputs"
    assert not [o for o in _outputs(nb) if len(_text(o)) > GEN.MAX_SAVED_HTML], "a circuitsvis bundle was saved"


def test_quickstart_runs_on_the_default_model():
    nb = _load("00_quickstart.ipynb")
    setup = "".join(_code_cells(nb)[0]["source"])
    assert 'os.environ.get("TL_SINKS_TUTORIAL_MODEL", "default")' in setup
    assert '# MODEL = "minilm"' in setup  # MiniLM stays one uncommented line away
    assert "LlamaForCausalLM" in "".join(_text(o) for o in _code_cells(nb)[0]["outputs"])


def test_value_aggregation_tutorial_says_what_its_numbers_show():
    """02 must not claim that the first token's variance stands out when its ratios are below 1."""
    nb = _load("02_value_aggregation.ipynb")
    md = " ".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    printed = "".join(_text(o) for o in _outputs(nb))
    assert "28 of 36 heads below 1" in printed and "in 28 of its 36 heads" in md
    assert "35 of 36 heads above 1" in printed and "35 of 36" in md
