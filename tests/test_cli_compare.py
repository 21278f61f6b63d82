"""`tl-sinks compare` and output paths that would overwrite a model file (a .gguf)."""

from __future__ import annotations

import json

import pytest

from tl_sinks import cli

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    from tl_sinks.gguf_export import export_gguf
    from tl_sinks.train.default_model import default_model_path

    return export_gguf(default_model_path(), tmp_path_factory.mktemp("gguf") / "default-q8_0.gguf", quantization="Q8_0")


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("The cat sat on the mat.\nParis is the capital of France.\ndef add(a, b): return a + b\n", encoding="utf-8")
    return p


def test_compare_prints_both_models_side_by_side(q8, prompts, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert cli.main(["compare", "default", str(q8), "--prompts", str(prompts), "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "sink_rate_pos0" in text and "chain_super_neurons" in text and str(q8) in text
    rows = {r["finding"]: r for r in json.loads(out.read_text(encoding="utf-8"))}
    # Q8_0 barely moves the default model's chain (tests/test_gguf.py measures it on all prompts).
    assert rows["sink_rate_pos0"]["change"] == pytest.approx(rows["sink_rate_pos0"][str(q8)] - rows["sink_rate_pos0"]["default"])
    assert abs(rows["sink_rate_pos0"]["change"]) < 0.05
    assert rows["top_super_neuron"]["default"] == rows["top_super_neuron"][str(q8)] == "L0N504"
    assert rows["chain_super_neurons"]["same"] is True


def test_an_output_path_that_is_the_model_file_is_refused(q8, capsys):
    before = q8.read_bytes()
    assert cli.main(["scan", "--model", str(q8), "--json", str(q8), "--no-progress"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("tl-sinks: error: --json") and "model" in err and len(err.splitlines()) == 1
    assert q8.read_bytes() == before
    assert cli.main(["compare", "default", str(q8), "--json", str(q8), "--no-progress"]) == cli.EXIT_USAGE
    assert q8.read_bytes() == before
