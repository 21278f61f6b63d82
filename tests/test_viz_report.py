"""Views, figures and the HTML report; the report is rendered in headless Chromium with the
network blocked, and every interactive view must have drawn itself into the DOM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import torch

import tl_sinks
from tests.conftest import random_prompts
from tl_sinks.cli import main
from tl_sinks.report import build_report
from tl_sinks.trace import trace_chain
from tl_sinks.viz import (
    figure_to_html,
    plot_intervention_sweep,
    plot_massive_activations,
    plot_sink_heatmap,
    plot_training_curves,
    plot_value_aggregation,
    show_attention,
    show_neuron_activations,
    show_tokens,
)
from tl_sinks.viz.views import circuitsvis_bundle, props_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_views_never_reference_the_cdn():
    v = show_attention(torch.softmax(torch.randn(2, 4, 4), -1).tril(), ["<s>", "a", "b", "c"], head_names=["L0H0", "L1H3"])
    for html in (v.local_src, v._repr_html_()):
        assert "unpkg.com" not in html and "CircuitsVis.render" in html
    assert v.local_src.startswith("<script>") and circuitsvis_bundle()[:100] in v.local_src
    assert "unpkg" not in v.fragment() and len(v.fragment()) < 5000


def test_attention_view_marks_the_sink_and_trims():
    p = torch.zeros(1, 6, 6)
    p[..., 0] = 1.0
    v = show_attention(p, ["<s>", "a", "b", "c", "d", "e"], head_names=["L2H1"], max_pos=4)
    props = json.loads(props_json(v))
    assert props["tokens"] == ["⟦sink⟧ <s>", "a", "b", "c"]
    assert props["attentionHeadNames"] == ["L2H1 sink=1.00"]
    assert torch.tensor(props["attention"]).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="head names"):
        show_attention(p, ["a"] * 6, head_names=["x", "y"])


def test_token_and_neuron_views_validate_shapes():
    v = show_tokens(["a", "b"], torch.tensor([[0.1, 1.0], [0.2, 2.0]]), labels=["x", "y"])
    assert v.element == "ColoredTokensMulti"
    with pytest.raises(ValueError, match="values for"):
        show_tokens(["a", "b"], [1.0])
    n = show_neuron_activations(["a", "b", "c"], torch.randn(3, 2), neuron_labels=["L0N1", "L1N2"])
    assert n.element == "ColoredTokensMulti" and json.loads(props_json(n))["labels"] == ["L0N1", "L1N2"]
    with pytest.raises(ValueError, match="activations must be"):
        show_neuron_activations(["a"], torch.randn(3, 2), neuron_labels=["x", "y"])


def test_figures_draw_from_results(tiny_llama):
    prompts = random_prompts([10] * 4, seed=30)
    r = tl_sinks.scan(tiny_llama, prompts, progress=False)
    t = trace_chain(tiny_llama, prompts, lambdas=(1, 5), progress=False)
    for fig in (plot_sink_heatmap(r.sinks), plot_value_aggregation(r.aggregation), plot_massive_activations(r.disparity),
                plot_intervention_sweep(t), plot_training_curves({"a": {"train": [[1, 3.0], [2, 2.5]], "val": [[2, 2.6]]}})):
        html = figure_to_html(fig)
        assert html.startswith('<img alt="figure" src="data:image/png;base64,') and len(html) > 2000


@pytest.fixture(scope="module")
def report_html(planted_llama):
    # The planted model has a super neuron, so all three interactive views appear.
    return build_report(planted_llama, [" ".join(f"w{i}" for i in range(k, k + 9)) for k in range(6, 12)], progress=False)


def test_report_is_self_contained(report_html):
    assert "unpkg.com" not in report_html
    assert report_html.count("CircuitsVis.render(") == 3
    assert report_html.count("data:image/png;base64,") == 4
    sections = ("The chain in numbers", "1. Value aggregation", "2. Super neurons", "3. Dimension disparity", "4. Sinks",
                "5. The causal chain, traced", "6. One prompt, interactively", "Provenance")
    at = [report_html.index(f">{s}</h2>") for s in sections]
    assert at == sorted(at)  # in the order of the chain


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TL_SINKS_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (CI installs it and sets TL_SINKS_REQUIRE_BROWSER=1)")
def test_report_renders_offline_in_headless_chromium(report_html, tmp_path):
    assert CHROMIUM is not None, "TL_SINKS_REQUIRE_BROWSER is set but chromium is not installed"
    page = tmp_path / "report.html"
    page.write_text(report_html, encoding="utf-8")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network at all: every view must come from the page
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    views = re.findall(r'<div id="(tl-sinks-cv-[0-9a-f]+)"[^>]*>(.*?)</div>', dom, flags=re.S)
    assert len(views) == 3
    # Before the JavaScript runs each view is an empty <div>; rendered, it holds the widget.
    for uid, inner in views:
        assert len(inner) > 50, f"view {uid} did not render"
    assert "w1" in dom  # token strings made it into the attention widget


def test_cli_report_writes_the_page(tiny_llama_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3 w4 w5 w6\nw7 w8 w9 w10 w11\n")
    out = tmp_path / "r.html"
    rc = main(["report", "--model", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out), "--no-trace", "--no-progress", "--device", "cpu"])
    assert rc == 0 and out.is_file()
    assert "no network needed" in capsys.readouterr().out
    html = out.read_text()
    assert "Skipped" not in html and "The causal chain, traced" not in html
    assert ">5. One prompt, interactively</h2>" in html  # numbered without a gap
