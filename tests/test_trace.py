"""trace_chain: link effects with baselines, and the position sweep, on the planted model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import tl_sinks
from tests.conftest import PLANT, random_prompts
from tl_sinks.interventions import AblateNeurons
from tl_sinks.trace import attention_to, next_token_loss, trace_chain


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([16] * 6, seed=40, low=10)


@pytest.fixture(scope="module")
def trace(planted_llama, prompts):
    return trace_chain(planted_llama, prompts, pos=7, lambdas=(1.0, 10.0), progress=False)


def test_ablation_links_use_the_found_super_neuron(trace, planted_llama, prompts):
    assert trace.neurons == [(PLANT["layer"], PLANT["neuron"])]
    dim_row = trace.links.iloc[0]
    assert f"dim {PLANT['massive_dim']} at pos 0" in dim_row["metric"]
    assert dim_row["baseline"] > 100 and dim_row["intervened"] < 1.0
    links = trace.links.set_index("metric")
    # The loss link is measured independently: same numbers as next_token_loss.
    loss = links.loc["next-token loss"]
    spec = AblateNeurons(neurons=((PLANT["layer"], PLANT["neuron"]),), pos=0, mode="mean")
    assert loss["baseline"] == pytest.approx(next_token_loss(planted_llama, prompts))
    assert loss["intervened"] == pytest.approx(next_token_loss(planted_llama, prompts, interventions=[spec]))
    for r in trace.links.itertuples():
        assert r.effect == pytest.approx(r.intervened - r.baseline)
    # The planted neuron makes the disparity: without it the first token's top dim is ordinary.
    disp = trace.links[trace.links.link == "-> dimension disparity"].iloc[0]
    assert f"layers {PLANT['layer'] + 1}-" in disp["metric"] or "residual stream" in disp["metric"]
    assert disp["baseline"] > 5 * disp["intervened"]


def test_next_token_loss_matches_the_model(planted_llama, prompts):
    tokens = torch.tensor(prompts)
    with torch.no_grad():
        logits = planted_llama(tokens)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert next_token_loss(planted_llama, prompts) == pytest.approx(float(ref), rel=1e-5)


def test_sweep_rows_and_exact_baseline(trace, planted_llama):
    L = planted_llama.cfg.n_layers
    sw = trace.sweep
    assert len(sw) == L * (2 + 2 * 2)
    none = sw[sw.intervention == "none"]["received"].to_numpy()
    for name in ("amplify_deviation", "scale_output"):
        unit = sw[(sw.intervention == name) & (sw.lam == 1.0)]["received"].to_numpy()
        assert (unit == none).all()  # lambda = 1 is an exact no-op
    assert (sw["baseline_received"].to_numpy().reshape(-1, L) == none).all()
    peak = trace.peak_received()
    assert set(peak["intervention"]) == {"none", "self_only_mask", "amplify_deviation", "scale_output"}
    assert math.isnan(peak.loc[peak.intervention == "none", "lam"].iloc[0])


def test_attention_to_matches_sink_scores(planted_llama, prompts):
    rec, rate = attention_to(planted_llama, prompts, 7)
    s = tl_sinks.compute_sink_scores(planted_llama, prompts, exclude_self=True)
    torch.testing.assert_close(rec, s.values[:, :, 7].mean(1))
    with pytest.raises(ValueError, match="no prompt has a query after position 15"):
        attention_to(planted_llama, prompts, 15)


def test_report_text(trace):
    text = trace.report()
    assert "ablating super neurons L1N7" in text and "interventions at position 7" in text
    assert "ChainTrace" in trace._repr_html_()


def test_encoders_have_no_loss_link(minilm):
    t = trace_chain(minilm, ["the cat sat on the mat today", "a man plays the guitar in the street"], lambdas=(1.0,), progress=False)
    assert "next-token loss" not in set(t.links["metric"])
    with pytest.raises(ValueError, match="causal models only"):
        next_token_loss(minilm, ["the cat sat"])


def test_trace_prints_briefly_and_round_trips(trace, tmp_path):
    from tl_sinks.trace import ChainTrace

    text = repr(trace)
    assert text.startswith("ChainTrace(pos=7") and len(text) < 2000 and "next-token loss" in text
    back = ChainTrace.load(trace.save(tmp_path / "trace.safetensors"))
    assert back.pos == trace.pos and [tuple(n) for n in back.neurons] == trace.neurons
    pd.testing.assert_frame_equal(back.links, trace.links)
    pd.testing.assert_frame_equal(back.sweep, trace.sweep)
    assert tl_sinks.load_result(tmp_path / "trace.safetensors").report() == trace.report()
