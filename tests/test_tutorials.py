"""The committed tutorials are what a reader sees: executed, with figures, without warnings.

nbmake re-executes every notebook in the suite (``--nbmake`` in pyproject's addopts, ``tutorials``
in its testpaths); these tests read the saved notebooks only, so they take no model time.
Regenerate with ``python tutorials/_make_notebooks.py --execute``.
"""

from __future__ import annotations

import importlib.util
import json
import re
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


SMOLLM2_SECTION = "## The paper's interventions on a real decoder (SmolLM2-135M-Instruct)"


def _smollm2_cells(nb: dict) -> tuple[str, dict, str]:
    """The section's intro markdown, its code cell and its closing markdown."""
    cells = nb["cells"]
    i = next(i for i, c in enumerate(cells) if "".join(c["source"]).startswith(SMOLLM2_SECTION))
    assert [c["cell_type"] for c in cells[i:]] == ["markdown", "code", "markdown"], "the section ends notebook 04"
    return "".join(cells[i]["source"]), cells[i + 1], "".join(cells[i + 2]["source"])


def test_interventions_tutorial_says_how_to_fetch_smollm2():
    intro, code, _ = _smollm2_cells(_load("04_interventions_and_patching.ipynb"))
    assert "tl-sinks fetch smollm2" in intro and "93 MB" in intro and "Apache-2.0" in intro
    assert "keyed to the BOS *token*" in intro
    # The reason it gives is the one the earlier cell printed on the default model.
    printed = "".join(_text(o) for o in _outputs(_load("04_interventions_and_patching.ipynb")))
    rates = re.search(r"sink rate at position 0 with BOS ([\d.]+), without ([\d.]+)", printed)
    assert rates and f"drops from {rates[1]} to {rates[2]}" in intro, (rates and rates.groups())
    src = "".join(code["source"])
    assert 'cached_path("smollm2")' in src and "ModelNotAvailableError" in src


def test_interventions_tutorial_smollm2_cell_without_the_model_prints_the_fetch_hint(tmp_path, monkeypatch, capsys):
    """Where SmolLM2 is not fetched the cell prints one line saying how to fetch it, and raises nothing
    (only the check runs: no model is loaded)."""
    import tl_sinks

    _, code, _ = _smollm2_cells(_load("04_interventions_and_patching.ipynb"))
    monkeypatch.setenv("TL_SINKS_CACHE", str(tmp_path))
    exec("".join(code["source"]), {"tl_sinks": tl_sinks, "prompts": tl_sinks.builtin_prompts()})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "`tl-sinks fetch smollm2`" in out[0], out


def test_interventions_tutorial_smollm2_text_matches_its_numbers():
    """The committed notebook shows the measurement (regenerate 04 with SmolLM2 fetched), and the
    closing text's claims hold for the numbers it printed, with margin."""
    import re

    _, code, md = _smollm2_cells(_load("04_interventions_and_patching.ipynb"))
    printed = "".join(_text(o) for o in code["outputs"])
    assert "SmolLM2-135M-Instruct, 8 prompts" in printed, (
        f"saved without SmolLM2: `tl-sinks fetch smollm2`, then regenerate 04. Printed: {printed[:300]!r}")
    assert any("image/png" in o.get("data", {}) for o in code["outputs"]), "the section's figure"
    row = re.compile(r"^\s+(\S+)(?: lambda=5)?\s+peak ([\d.]+) \(layer\s+(\d+)\), mean over layers 1-29 ([\d.]+), "
                     r"above eps=0.3 in\s+(\d+) of 30 layers, sink rate at 10 up to ([\d.]+)$", re.M)
    got = {m[1]: dict(zip(("peak", "layer", "mean", "above", "rate"), map(float, m.groups()[1:]))) for m in row.finditer(printed)}
    assert set(got) == {"none", "self_only_mask", "amplify_deviation", "scale_output"}, printed
    none, mask, amp, scale = (got[k] for k in ("none", "self_only_mask", "amplify_deviation", "scale_output"))
    uniform = float(re.search(r"uniform attention would give ([\d.]+)", printed)[1])
    # "Untouched, p receives at most 0.04 ..., below what uniform attention would give it (0.05)."
    assert none["peak"] < uniform and none["above"] == 0 and f"({uniform:.2f})" in md
    # "the mean over heads passes eps in 12 of its 30 layers and peaks at 0.44 in layer 24, where 99% of the heads ..."
    assert mask["above"] >= 5 and mask["peak"] > 0.3 and mask["rate"] > 0.8, mask
    assert f"in {mask['above']:.0f} of its 30 layers" in md and f"peaks at {mask['peak']:.2f} in layer {mask['layer']:.0f}" in md
    assert f"where {mask['rate']:.0%} of the heads" in md
    # "Deviation amplification makes no sink": below eps everywhere, far below the mask's sink rate,
    # but above the control (its mean over layers 1-29 at least twice scaling's).
    assert amp["above"] == 0 and amp["peak"] < 0.3 and amp["rate"] < 0.5 * mask["rate"], amp
    assert amp["mean"] > 2 * scale["mean"] and f"{amp['mean']:.3f}, against {scale['mean']:.3f}" in md
    assert f"peak {amp['peak']:.2f}, layer {amp['layer']:.0f}" in md and "a quarter" in md and amp["rate"] <= 0.25 + 1e-9
    # "The control is not inert ... about doubles the attention p receives": at least 1.5x, and no sink.
    assert 1.5 * none["mean"] < scale["mean"] < 3 * none["mean"] and scale["above"] == 0, (scale, none)
    assert f"{scale['mean']:.3f}, against {none['mean']:.3f} untouched" in md and f"up to {scale['peak']:.2f}" in md
