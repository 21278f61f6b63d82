"""What a reader of the report and the views sees is true (issue 14).

Each check reads what is shown: colours in the DOM headless Chromium renders, the artists of a
figure (lines, patches, titles), the text of the rendered page. The numbers they are compared
with come from the results, never from the code that draws them.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch

import tl_sinks
from tests.conftest import PLANT, random_prompts
from tests.helpers import chromium
from tl_sinks.report import (
    build_report,
    fmt_change,
    fmt_number,
    fmt_percent,
    plain_summary,
    provenance_html,
    story_html,
    verdict,
)
from tl_sinks.trace import ChainTrace, trace_chain
from tl_sinks.viz import (
    plot_intervention_sweep,
    plot_massive_activations,
    plot_sink_heatmap,
    show_attention,
    show_neuron_activations,
    show_tokens,
)
from tl_sinks.viz.views import MARKUP_BREAK, props_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("TL_SINKS_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (CI installs it and sets TL_SINKS_REQUIRE_BROWSER=1)",
)
PROMPTS = [" ".join(f"w{i}" for i in range(k, k + 9)) for k in range(6, 12)]


def _dom(page: str, tmp_path: Path) -> str:
    return chromium(page, tmp_path, "--dump-dom")


def _view_tokens(dom: str, uid: str) -> list[tuple[str, tuple[int, int, int]]]:
    """(token text, background rgb) of every coloured token of the view ``uid``, in order."""
    start = dom.index(f'id="{uid}"')
    end = dom.find('class="tl-sinks-view"', dom.index(">", start))  # the next view
    block = dom[start:end if end > 0 else len(dom)]
    spans = re.findall(r'<span style="display: inline-block; background-color: rgb\((\d+), (\d+), (\d+)\);[^"]*">(.*?)</span>', block)
    # The token text holds an invisible joiner where it would open markup ("<\u2060s>"; see views.MARKUP_BREAK).
    return [(html.unescape(t).replace(MARKUP_BREAK, ""), (int(r), int(g), int(b))) for r, g, b, t in spans]


def _saturation(rgb: tuple[int, int, int]) -> int:
    """How far from white: 0 for white, 255 for a pure colour."""
    return 255 - min(rgb)


def _page(*views) -> str:
    from tl_sinks.viz import circuitsvis_bundle

    body = "\n".join(v.fragment() for v in views)
    return f"<!doctype html><html><head><meta charset='utf-8'><script>{circuitsvis_bundle()}</script></head><body>{body}</body></html>"


# --------------------------------------------------------------------------- 1. one colour scale per view
# L0N504 of the default model on "... the rain ...": 24.2 at <s>, about 0 elsewhere; -0.01 at "in"
# was its minimum, which circuitsvis' own per-neuron min/max scale painted full red.
TOKENS = ["<s>", "The", "cat", "watched", "the", "ra", "in", "fall"]
L0N504 = [24.2, 0.35, 0.2, 0.5, 0.15, 0.3, -0.01, 0.25]
L2N168 = [-12.8, 0.1, 0.05, -0.2, 0.0, 0.1, 0.02, -0.05]


def test_token_views_carry_one_symmetric_scale():
    acts = torch.tensor([L0N504, L2N168]).T
    n = json.loads(props_json(show_neuron_activations(TOKENS, acts, neuron_labels=["L0N504", "L2N168"])))
    assert n["positiveBounds"] == [24.2, 24.2] and n["negativeBounds"] == [-24.2, -24.2]  # max |x| over every neuron
    one = json.loads(props_json(show_tokens(TOKENS, torch.tensor(L2N168))))
    assert (one["minValue"], one["maxValue"]) == (-12.8, 12.8)
    multi = json.loads(props_json(show_tokens(TOKENS, acts, labels=["a", "b"], max_abs=30.0)))
    assert multi["positiveBounds"] == [30.0, 30.0] and multi["negativeBounds"] == [-30.0, -30.0]
    zeros = json.loads(props_json(show_tokens(["a", "b"], torch.zeros(2))))
    assert (zeros["minValue"], zeros["maxValue"]) == (-1.0, 1.0)  # white everywhere, not 0/0
    with pytest.raises(ValueError, match="max_abs"):
        show_tokens(["a"], [1.0], max_abs=0.0)


@needs_browser
def test_neuron_and_token_views_paint_the_largest_value_most_saturated(tmp_path):
    acts = torch.tensor([L0N504, L2N168]).T
    views = [show_neuron_activations(TOKENS, acts, neuron_labels=["L0N504", "L2N168"]), show_tokens(TOKENS, torch.tensor(L2N168))]
    dom = _dom(_page(*views), tmp_path)
    for view, values in zip(views, (L0N504, L2N168)):  # the neuron view shows its first neuron
        shown = _view_tokens(dom, view.uid)
        assert [t for t, _ in shown] == TOKENS
        colours = dict(shown)
        sat = [_saturation(c) for _, c in shown]
        assert sat.index(max(sat)) == 0 and sat[0] == 255  # <s>, the largest |value|, is a full colour
        assert colours["<s>"] == ((0, 0, 255) if values[0] > 0 else (255, 0, 0))  # blue positive, red negative
        assert min(colours["in"]) >= 250  # -0.01 (or 0.02) on a scale of +-24.2 (+-12.8): near white
        # the more |value|, the more colour: saturation ranks the tokens as |value| does
        order = sorted(range(len(values)), key=lambda i: abs(values[i]))
        assert [sat[i] for i in order] == sorted(sat)


# --------------------------------------------------------------------------- 5. short repr
def test_views_print_a_short_line_not_the_bundle():
    v = show_tokens(TOKENS, torch.tensor(L0N504))
    a = show_attention(torch.softmax(torch.randn(2, 4, 4), -1).tril(), TOKENS[:4])
    assert repr(v) == str(v) == "<OfflineView ColoredTokens: 8 tokens, colour scale +-24.2; display in Jupyter or .save(path)>"
    assert repr(a) == "<OfflineView AttentionHeads: 4 tokens, 2 heads; display in Jupyter or .save(path)>"
    assert len(v._repr_html_()) > 1_000_000 and "CircuitsVis.render" in v.local_src  # Jupyter still gets the widget


# --------------------------------------------------------------------------- 2. the matplotlib backend
def test_importing_and_plotting_leave_the_backend_alone(tiny_llama_dir):
    # A user who chose a backend keeps it: import the viz package, draw every figure, write a report.
    code = f"""
import sys, matplotlib
matplotlib.use("svg")
import tl_sinks, tl_sinks.viz
from tl_sinks.report import build_report
assert "matplotlib.pyplot" not in sys.modules, "tl_sinks imported pyplot"
model = tl_sinks.load_model({str(tiny_llama_dir)!r}, device="cpu")
page = build_report(model, {PROMPTS[:3]!r}, trace=False, progress=False)
assert "data:image/png;base64," in page
print("backend", matplotlib.get_backend(), "pyplot" if "matplotlib.pyplot" in sys.modules else "no-pyplot")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["svg", "no-pyplot"]


def test_figures_stay_out_of_the_users_pyplot(tiny_llama):
    import matplotlib.pyplot as plt

    before, backend = plt.get_fignums(), matplotlib.get_backend()
    r = tl_sinks.scan(tiny_llama, random_prompts([10] * 4, seed=30), progress=False)
    figs = [plot_sink_heatmap(r.sinks), plot_massive_activations(r.disparity)]
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend  # plt.show() would not show ours
    assert all(f._repr_png_().startswith(b"\x89PNG") for f in figs)  # Jupyter displays them anyway


# --------------------------------------------------------------------------- 3. figures
def _sweep_trace(pos: int = 5, eps: float = 0.3) -> ChainTrace:
    rows = []
    for name, lam, rec in [("none", float("nan"), [0.05, 0.055]), ("self_only_mask", float("nan"), [0.052, 0.056]),
                           ("amplify_deviation", 1.0, [0.05, 0.055]), ("amplify_deviation", 10.0, [0.06, 0.07]),
                           ("scale_output", 1.0, [0.05, 0.055]), ("scale_output", 10.0, [0.049, 0.05])]:
        rows += [{"intervention": name, "lam": lam, "layer": i, "received": v, "sink_rate": 0.0, "baseline_received": 0.05}
                 for i, v in enumerate(rec)]
    return ChainTrace(links=pd.DataFrame(columns=["link", "metric", "baseline", "intervened", "effect", "relative"]),
                      sweep=pd.DataFrame(rows), pos=pos, meta={"eps": eps, "lambdas": [1.0, 10.0]})


def test_sweep_plot_draws_eps_and_uniform_and_keeps_them_in_view():
    fig = plot_intervention_sweep(_sweep_trace(), uniform=0.06)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        eps = [ln for ln in ax.get_lines() if ln.get_gid() == "eps"]
        uni = [ln for ln in ax.get_lines() if ln.get_gid() == "uniform"]
        assert len(eps) == 1 and set(eps[0].get_ydata()) == {0.3} and eps[0].get_linestyle() == "--"
        assert eps[0].get_label() == "sink threshold eps=0.3"
        assert len(uni) == 1 and set(uni[0].get_ydata()) == {0.06}
        assert ax.get_ylim() == pytest.approx((0.0, 0.33))  # 0 .. 1.1 x max(eps, data): 0.07 of 0.3 looks small
        assert "sink threshold eps=0.3" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert fig._suptitle.get_text().startswith("no intervention made position 5 a sink")


def test_sink_heatmap_outlines_only_the_heads_above_eps(tiny_llama):
    import dataclasses

    r = tl_sinks.scan(tiny_llama, random_prompts([6] * 4, seed=31), progress=False)
    # Known cells: neighbours above eps (they must stay separate boxes), cells at and just below it.
    known = torch.tensor([[0.9, 0.8, 0.3, 0.1], [0.31, 0.05, 0.95, 0.29]])
    values = r.sinks.values.clone()
    values[:, :, 0] = known
    sinks = dataclasses.replace(r.sinks, values=values)
    v = known.numpy()
    (ax,) = [a for a in plot_sink_heatmap(sinks).axes if a.get_images()]
    boxes = [p for p in ax.patches if p.get_gid() == "above_eps"]
    assert len(boxes) == len(ax.patches) == 4  # no edge on any other cell
    cells = set()
    for p in boxes:
        x0, y0 = p.get_xy()
        head, layer = round(x0 + p.get_width() / 2), round(y0 + p.get_height() / 2)
        cells.add((layer, head))
        # inside its own cell with a margin: neighbouring outlines never touch, so they cannot merge into a grid
        assert head - 0.5 < x0 and x0 + p.get_width() < head + 0.5 and layer - 0.5 < y0 and y0 + p.get_height() < layer + 0.5
        assert p.get_linewidth() >= 2
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 2)}
    assert {t.get_text() for t in ax.texts} == {f"{x:.2f}" for x in v.flatten()}  # the values are written in the cells


def test_massive_chart_says_what_it_shows(tiny_llama, planted_llama):
    plain = tl_sinks.scan(tiny_llama, random_prompts([10] * 4, seed=30), progress=False).disparity
    assert plain.massive_dims().empty
    title = plot_massive_activations(plain).axes[0].get_title()
    assert title.startswith("largest first-token residual dims (|x| at position 0) vs the rest")
    assert "no Sun-massive dim at position 0" in title and "massive activations" not in title
    planted = tl_sinks.scan(planted_llama, PROMPTS, progress=False).disparity
    md = planted.massive_dims()
    assert PLANT["massive_dim"] in set(md["dim"])
    ax = plot_massive_activations(planted).axes[0]
    assert f"Sun-massive dims at position 0: {PLANT['massive_dim']} (layers" in ax.get_title()
    (thr,) = [ln for ln in ax.get_lines() if ln.get_gid() == "sun_threshold"]
    layer = int(planted.first_mean_abs.max(1).values.argmax())
    assert thr.get_ydata()[0] == pytest.approx(max(100.0, 1000.0 * float(planted.median[layer, 0])))


# --------------------------------------------------------------------------- 4. the story
def test_numbers_read_sensibly():
    assert [fmt_number(x) for x in (10075946.0, 196.2, 13.957, 0.6638, 0.00012, -2.5e-5, 0)] == \
        ["1.0e7", "196", "14", "0.664", "1.2e-4", "-2.5e-5", "0"]
    assert fmt_change(13.96, 0.1632) == "14 \u2192 0.163 (-99%)"
    assert fmt_change(0.01, 1.5) == "0.01 \u2192 1.5 (150x)"


def _fake_trace(result, links: list[tuple[str, str, float, float]]) -> ChainTrace:
    t = _sweep_trace()
    df = pd.DataFrame([{"link": a, "metric": m, "baseline": b, "intervened": i, "effect": i - b, "relative": (i - b) / abs(b)}
                       for a, m, b, i in links])
    return ChainTrace(links=df, sweep=t.sweep, pos=t.pos, neurons=[(1, 7)],
                      meta={**t.meta, "ablation_selection": "chain", "ablated": ["L1N7"], "ablation_note": "chain super neurons"})


def test_story_tells_the_chain_in_numbers(planted_llama):
    result = tl_sinks.scan(planted_llama, PROMPTS, progress=False)
    dim = result.summary()["massive_dim_pos0"]
    assert dim == PLANT["massive_dim"]
    t = _fake_trace(result, [
        ("super neurons -> massive dim", f"mean |x| of dim {dim} at pos 0, layer 2", 40.0, 0.4),
        ("-> dimension disparity", "paper ratio at pos 0", 50.0, 8.0),
        ("-> sink", "sink rate at pos 0 (eps=0.3)", 0.5, 0.19),
        ("-> sink", "mean attention received by pos 0", 0.4, 0.2),
        ("-> loss", "next-token loss", 4.0, 4.4),
    ])
    label = result.super_neurons.found.iloc[0]["label"]
    assert verdict(result, t) == (f"Super neuron {label} writes dim {dim} at the first token; ablating the chain super neurons "
                                  f"(L1N7) there removes 99% of dim {dim} and 62% of the sink (sink rate 0.5 \u2192 0.19).")
    assert verdict(result) == f"Super neuron {label} writes dim {dim} at the first token; the causal links were not traced."
    page = story_html(result, t)
    rows = re.findall(r"<tr><td class='link'><a href='#([\w-]+)'>([^<]+)</a>", page)
    assert [r[1] for r in rows] == ["value aggregation", "super neurons", "dimension disparity", "sink", "loss"]
    assert "40 \u2192 0.4 (<b>-99%</b>)" in page and "0.5 \u2192 0.19 (<b>-62%</b>)" in page and "4 \u2192 4.4 (<b>+10%</b>)" in page
    assert f"written by super neuron {label}: <b>yes</b>" in page  # super_neuron_writes_massive_dim, in words
    untraced = story_html(result)
    assert untraced.count("not traced") >= 8 and "\u2192" not in untraced


@pytest.fixture(scope="module")
def traced_page(planted_llama):
    return build_report(planted_llama, PROMPTS, progress=False)


@pytest.fixture(scope="module")
def traced_dom(traced_page, tmp_path_factory):
    if CHROMIUM is None and not os.environ.get("TL_SINKS_REQUIRE_BROWSER"):
        pytest.skip("Debian's chromium is not installed (CI installs it and sets TL_SINKS_REQUIRE_BROWSER=1)")
    return _dom(traced_page, tmp_path_factory.mktemp("dom"))


def _text(dom_part: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom_part))).strip()


def test_report_opens_with_the_verdict_and_the_chain(traced_dom, planted_llama):
    body = traced_dom[traced_dom.index("<body>"):]
    first_h2 = body.index("<h2")
    assert _text(body[first_h2:body.index("</h2>")]).endswith("The chain in numbers")
    after = body[body.index("</h2>"):]
    assert after[len("</h2>"):].lstrip().startswith("<p class=\"verdict\"")  # the verdict comes first, then the table
    t = trace_chain(planted_llama, PROMPTS, progress=False)  # the page's numbers are the trace's
    dim_row = t.links.iloc[0]
    verdict_text = _text(after[:after.index("</p>")])
    assert f"removes {fmt_percent(-dim_row.relative)} of dim {PLANT['massive_dim']}" in verdict_text
    story = after[after.index("<table"):after.index("</table>")]
    assert [_text(c) for c in re.findall(r'<td class="link">(.*?)</td>', story)] == \
        ["value aggregation", "super neurons", "dimension disparity", "sink", "loss"]
    squeeze = lambda x: re.sub(r"\s", "", x)  # noqa: E731
    for r in t.links.itertuples():
        label = "" if r.link == "-> loss" else f"{r.metric}: "  # the loss row shows the change alone
        assert squeeze(f"{label}{fmt_change(r.baseline, r.intervened)}") in squeeze(_text(story))
    assert _text(story).count("not traced") == 0
    # the scan's text is still there, folded, with the attention type said once
    details = body[body.index("<details"):body.index("</details>")]
    assert _text(details).count("attention: causal") == 0 and "causal attention" in _text(details)


def test_report_without_trace_says_the_links_were_not_traced(planted_llama):
    page = build_report(planted_llama, PROMPTS, trace=False, progress=False)
    story = page[page.index("id='story'"):page.index("</table>", page.index("id='story'"))]
    assert story.count("not traced</td>") == 10  # both causal columns, all five links
    assert "the causal links were not traced" in page[page.index("class='verdict'"):][:600]


def test_plain_summary_says_the_attention_type_once(planted_llama):
    r = tl_sinks.scan(planted_llama, PROMPTS, progress=False)
    assert r.report().count("attention: causal") == 0 and "causal attention" in r.report().splitlines()[0]
    text = plain_summary(r)
    assert text.count("causal") == 1 and text.splitlines()[0] == r.report().splitlines()[0]


def test_provenance_is_a_readable_table(traced_dom, planted_llama_dir):
    prov = traced_dom[traced_dom.index('id="provenance"'):]
    rows = {_text(k): _text(v) for k, v in re.findall(r'<tr><td class="key">(.*?)</td><td>(.*?)</td></tr>', prov)}
    import transformers

    assert rows["model"] == f"{planted_llama_dir.name} {planted_llama_dir}"  # the name, then the full path, smaller
    assert rows["transformers version"] == transformers.__version__ and rows["torch version"] == torch.__version__
    assert rows["processing.fold_ln"] == "False" and rows["processing.processing"] == "none"
    assert rows["trace.ablated"] == f"L{PLANT['layer']}N{PLANT['neuron']}"
    assert not any(v.startswith("{") for v in rows.values())  # no raw Python dicts
    assert "small" in prov[:prov.index("</table>")]


def test_provenance_shows_hub_names_as_they_are():
    page = provenance_html({"model_name": "gpt2", "processing": {"fold_ln": True, "random_head": []}, "torch_version": "x"})
    assert "<td>gpt2</td>" in page and "processing.fold_ln</td><td>True" in page and "processing.random_head</td><td>none" in page
    assert page.count("torch") == 1  # a version in meta is not shown twice


@needs_browser
def test_report_neuron_view_points_at_the_first_token(traced_page, traced_dom):
    uid = re.findall(r'<div id="(tl-sinks-cv-[0-9a-f]+)" class="tl-sinks-view" data-element="ColoredTokensMulti"', traced_page)[-1]
    props = json.loads(re.search(rf'CircuitsVis\.render\("{uid}", CircuitsVis\.ColoredTokensMulti, (.*?)\);</script>', traced_page).group(1))
    first = [row[0] for row in props["values"]]  # the column shown first: the top super neuron
    assert props["positiveBounds"][0] == pytest.approx(max(abs(x) for row in props["values"] for x in row), rel=1e-5)
    shown = _view_tokens(traced_dom, uid)
    sat = [_saturation(c) for _, c in shown]
    assert len(shown) == len(first) and sat.index(max(sat)) == 0 == max(range(len(first)), key=lambda i: abs(first[i]))
    for x, s in zip(first, sat):
        if abs(x) < 0.01 * props["positiveBounds"][0]:
            assert s <= 6  # near zero is near white


# --------------------------------------------------------------------------- 6. progress
class _Bars:
    """Records the label of every progress bar shown (tqdm replaced in the modules that make them)."""

    def __init__(self, monkeypatch):
        from tqdm import tqdm

        self.labels: list[str] = []
        rec = self.labels

        class Recording(tqdm):
            def __init__(self, *a, **k):
                super().__init__(*a, **{**k, "file": open(os.devnull, "w")})  # noqa: SIM115
                if not self.disable and self.desc:
                    rec.append(self.desc)

            def set_description_str(self, desc=None, refresh=True):
                super().set_description_str(desc, refresh)
                if not self.disable:
                    rec.append(desc)

        for mod in ("tl_sinks.hooks", "tl_sinks.report", "tl_sinks.patching"):
            monkeypatch.setattr(f"{mod}.tqdm", Recording)


def test_report_shows_each_step_and_passes_progress_on(planted_llama, monkeypatch):
    import tl_sinks.report as report
    import tl_sinks.trace as trace

    bars, calls = _Bars(monkeypatch), []
    for mod, name in ((report, "scan"), (trace, "trace_chain")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (calls.append((_name, k.get("progress"))), _real(*a, **k))[1])
    build_report(planted_llama, PROMPTS[:4], progress=True)
    assert calls == [("scan", True), ("trace_chain", True)]
    assert sum(s.startswith("tl_sinks: sinks, aggregation, super_neurons, disparity") for s in bars.labels) == 1  # one scan
    steps = [s for s in bars.labels if s.startswith("tl_sinks report")]
    assert len(steps) == len(set(steps)) == 4 and steps[1].endswith("trace the chain: ablation, loss and the position interventions")


def test_report_progress_bars_have_distinct_labels_and_cover_the_sweep(planted_llama, monkeypatch):
    bars = _Bars(monkeypatch)
    build_report(planted_llama, PROMPTS[:4], progress=True)
    stage_bars = [s for s in bars.labels if not s.startswith("tl_sinks report")]
    assert len(stage_bars) == len(set(stage_bars)), stage_bars  # no two bars read the same
    conditions = ["self_only_mask"] + [f"{name} lambda={lam:g}" for name in ("amplify_deviation", "scale_output")
                                       for lam in (1, 2, 5, 10, 20, 30)]
    silent = [c for c in conditions if not any(c in s for s in stage_bars)]
    assert not silent, f"no progress bar for {silent}"  # the sweep is most of the trace's time
