"""Result objects (DataFrames, HTML, validation) and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

import tl_sinks
from tests.conftest import random_prompts
from tl_sinks.cli import main
from tl_sinks.results import SinkResult


def test_sink_result_to_frame_and_top():
    r = SinkResult(
        values=torch.tensor([[1.0, -5.0], [3.0, 2.0]]), dims=("layer", "head_index"), value_name="v",
        coords={"head_index": ["a", "b"]},
    )
    df = r.to_frame()
    assert list(df.columns) == ["layer", "head_index", "v", "head_index_label"]
    assert df.loc[(df.layer == 0) & (df.head_index == 1), "v"].item() == -5.0
    assert r.top(1)["v"].tolist() == [3.0]
    assert r.top(1, by_abs=True)["v"].tolist() == [-5.0]
    assert "<table" in r._repr_html_() and "<script" not in r._repr_html_()
    assert repr(r).startswith("SinkResult[layer=2, head_index=2]")


def test_sink_result_validates_dims_and_coords():
    with pytest.raises(ValueError, match="dims"):
        SinkResult(values=torch.zeros(2, 2), dims=("layer",), value_name="v")
    with pytest.raises(ValueError, match="labels"):
        SinkResult(values=torch.zeros(2), dims=("layer",), value_name="v", coords={"layer": ["x"]})
    with pytest.raises(ValueError, match="unknown dim"):
        SinkResult(values=torch.zeros(2), dims=("layer",), value_name="v", coords={"pos": ["x", "y"]})


@pytest.fixture(scope="module")
def scan_result(tiny_llama):
    return tl_sinks.scan(tiny_llama, random_prompts([7, 5, 9]), progress=False)


def test_stage_results_render_and_convert(scan_result):
    for name in ("sinks", "aggregation", "super_neurons", "disparity"):
        res = getattr(scan_result, name)
        df = res.to_frame()
        assert isinstance(df, pd.DataFrame)
        assert len(df) == res.values.numel()
        assert list(df.columns[: len(res.dims)]) == list(res.dims)
        html = res._repr_html_()
        assert type(res).__name__ in html and "<script" not in html
        assert res.meta["model_name"] and res.meta["transformer_lens_version"]
        assert res.meta["processing"]["processing"] == "none"
        moved = res.to("cpu")
        assert torch.equal(moved.values, res.values)
    assert scan_result.aggregation.first_rest_ratio().values.shape == (2, 4)
    assert scan_result.sinks.sink_rate_by_pos().values.shape[0] == 9
    with pytest.raises(ValueError, match="no prompt reached key position 40"):
        scan_result.sinks.sink_rate(40)


def test_scan_result_summary_report_and_frame(scan_result):
    s = scan_result.summary()
    assert s["n_prompts"] == 3 and s["n_tokens"] == 21
    assert 0.0 <= s["sink_rate_pos0"] <= 1.0
    assert s["mean_received_pos0"] == pytest.approx(scan_result.sinks.mean_received(0))
    assert "[sinks]" in scan_result.report() and "[disparity]" in scan_result.report()
    df = scan_result.to_frame()
    assert set(df["finding"]) == set(s)
    assert "ScanResult" in scan_result._repr_html_()


def test_cli_scan_prints_report_and_writes_json(tiny_llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4\n\nw5 w6 w7\n")
    out = tmp_path / "out.json"
    rc = main(["scan", "--model", str(tiny_llama_dir), "--prompts", str(prompts), "--json", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert "tl_sinks scan of" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["summary"]["n_prompts"] == 2
    assert payload["meta"]["attention"] == "causal"


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = main(["scan", "--model", str(tmp_path / "missing-model"), "--no-progress"])
    assert rc == 3  # the model could not be loaded
    err = capsys.readouterr().err
    assert err.startswith("tl-sinks: error: --model ") and "missing-model" in err and err.count("\n") == 1
    assert main(["scan", "--model", "minilm", "--prompts", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_entry_point_is_installed():
    out = subprocess.run([sys.executable, "-m", "tl_sinks.cli", "--help"], capture_output=True, text=True, check=True)
    assert "scan" in out.stdout
