"""The shipped default model: it loads offline, its card is what the weights measure, and it shows
the causal chain the paper describes (re-measured here with scan and trace_chain, not asserted
from the card).

Thresholds sit well below the values measured when the model was installed (MODEL_CARD.md,
chain.json); each says which property of the chain it guards.
"""

from __future__ import annotations

import json
import math

import pytest

import tl_sinks
from tl_sinks.train.default_model import DEFAULT_MODEL_DIR, RECIPE, card_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return tl_sinks.load_model("default", device="cpu")


@pytest.fixture(scope="module")
def card():
    return json.loads((DEFAULT_MODEL_DIR / "chain.json").read_text())


@pytest.fixture(scope="module")
def builtin_scan(model):
    return tl_sinks.scan(model, tl_sinks.builtin_prompts(), batch_size=16, progress=False)


@pytest.fixture(scope="module")
def heldout_scan(model):
    return tl_sinks.scan(model, card_prompts(model.tokenizer), batch_size=16, progress=False)


def test_it_is_the_recipe_and_loads_like_a_hub_model(model):
    training = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    assert training["config"] == RECIPE.to_dict() and training["steps"] == RECIPE.steps
    info = tl_sinks.inspect_model(model)
    assert info.architecture == "LlamaForCausalLM" and info.causal and not info.post_ln
    assert info.n_layers == RECIPE.n_layers and info.n_heads == RECIPE.n_heads
    assert model.tokenizer.bos_token_id == info.first_token_id
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").is_file() and (DEFAULT_MODEL_DIR / "loss_curve.json").is_file()
    # It is a trained language model: far below the loss of a uniform guess over the vocabulary.
    assert training["final_val_loss"] < 0.6 * math.log(RECIPE.vocab_size)


@pytest.mark.parametrize("key", ["heldout", "builtin"])
def test_the_card_is_what_the_weights_measure(card, builtin_scan, heldout_scan, key):
    s = (heldout_scan if key == "heldout" else builtin_scan).summary()
    c = card[key]["summary"]
    for name in ("sink_rate_pos0", "mean_received_pos0", "var_ratio_first_rest_median", "massive_dim_value",
                 "disparity_pos0_attn_in", "disparity_rest_attn_in"):
        assert s[name] == pytest.approx(c[name], rel=1e-3, abs=1e-4), name
    for name in ("massive_dim_pos0", "massive_dim_layer", "n_super_neurons", "top_super_neuron"):
        assert s[name] == c[name], name


@pytest.mark.parametrize("key", ["heldout", "builtin"])
def test_the_card_reports_each_super_neurons_role(card, builtin_scan, heldout_scan, key):
    # The card counts the chain super neurons apart from the other high-ratio ones (not "7 found").
    from tl_sinks.train.default_model import _super_neuron_line

    found = (heldout_scan if key == "heldout" else builtin_scan).super_neurons.found
    rows = card[key]["super_neurons"]
    assert [(n["label"], n["role"]) for n in rows] == list(zip(found["label"], found["role"]))
    chain = list(found[found["role"] == "chain"]["label"])
    assert card[key]["ablated"] == chain and card[key]["ablation_selection"] == "chain"
    line = _super_neuron_line(rows)
    assert line in (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert f"{len(rows)} found; {len(chain)} in the chain (first token and channel-sparse down row): {chain[0]} peak" in line
    if len(rows) > len(chain):
        assert f"the other {len(rows) - len(chain)} (" in line or "more fire" in line


# --------------------------------------------------------------------------- the chain, re-measured
# Thresholds sit at about half of what was measured at install (chain.json, MODEL_CARD.md; in
# brackets), far above what an untrained model of the same shape gives (no sink, no outlier dim).
BUILTIN_SINK_RATE_MIN = 0.4  # [0.66: 24 of 36 heads on the built-in prompts]
BUILTIN_LATER_LAYERS_SINK_MIN = 0.5  # [0.70: mean sink rate of layers 1-5]
HELDOUT_SINK_RATE_MIN = 0.09  # [0.18 on 128-token windows, where the uniform baseline is 0.042]
HELDOUT_BEST_LAYER_SINK_MIN = 0.5  # [0.82: layer 3]
SINK_MIN_RATIO_TO_UNIFORM = 2.0  # [4.1 held-out, 2.9 built-in]
MASSIVE_RATIO_TO_MEDIAN_MIN = 20.0  # [47x the token's median |x|]
DISPARITY_FIRST_OVER_REST_MIN = 2.5  # [72 at position 0 against 13.6 elsewhere]
FIRST_OVER_REST_MAX_MIN = 1.5  # [mean |x| of dim 81 at position 0 is 3x its largest value elsewhere]
SUPER_KURTOSIS_MIN = 20.0  # [excess kurtosis 47 (L0N504) and 76 (L2N168)]
SUPER_TOP1_SHARE_MIN = 0.2  # [36% and 57% of the down row's squared norm in one dim]
ABLATION_MASSIVE_DROP_MIN = 0.5  # [-99%]
ABLATION_SINK_DROP_MIN = 0.3  # [-62% on the built-in prompts]


def test_first_token_sink_in_most_heads_after_the_first_layer(builtin_scan, heldout_scan):
    b, h = builtin_scan.sinks, heldout_scan.sinks
    assert b.sink_rate(0) > BUILTIN_SINK_RATE_MIN
    assert float(b.sink_rate_by_layer(0).values[1:].mean()) > BUILTIN_LATER_LAYERS_SINK_MIN
    assert h.sink_rate(0) > HELDOUT_SINK_RATE_MIN
    assert float(h.sink_rate_by_layer(0).values.max()) > HELDOUT_BEST_LAYER_SINK_MIN
    for s in (b, h):
        assert s.ratio_to_uniform(0) > SINK_MIN_RATIO_TO_UNIFORM
        # Position 0 is the sink: no other early key position comes near it.
        assert s.mean_received(0) > 3 * max(s.mean_received(k) for k in range(1, 6))


def test_massive_activation_at_the_first_token(heldout_scan):
    d = heldout_scan.disparity
    s = heldout_scan.summary()
    dim, layer = s["massive_dim_pos0"], s["massive_dim_layer"]
    assert s["massive_dim_ratio_to_median"] > MASSIVE_RATIO_TO_MEDIAN_MIN
    # The dim is massive at the first token only: its mean there beats its largest value anywhere else.
    assert float(d.first_mean_abs[layer, dim]) > FIRST_OVER_REST_MAX_MIN * float(d.rest_max_abs[layer, dim])
    assert s["disparity_pos0_attn_in"] > DISPARITY_FIRST_OVER_REST_MIN * s["disparity_rest_attn_in"]


def test_a_channel_sparse_super_neuron_fires_at_the_first_token(heldout_scan):
    f = heldout_scan.super_neurons.found
    at0 = f[f["max_pos"] == 0]
    assert len(at0) >= 1
    top = at0.iloc[0]
    assert top["down_kurtosis"] > SUPER_KURTOSIS_MIN and top["top1_share"] > SUPER_TOP1_SHARE_MIN
    # It writes into the massive dim.
    assert heldout_scan.summary()["massive_dim_pos0"] in list(top["top_dims"])


def test_the_sink_is_keyed_to_bos(model):
    """Measured property of this model (see the card): drop BOS and the sink is gone, although
    the first token still attends only to itself."""
    w = card_prompts(model.tokenizer)[:32]
    with_bos = tl_sinks.compute_sink_scores(model, w, progress=False)
    without = tl_sinks.compute_sink_scores(model, w[:, 1:], require_bos=False, progress=False)
    assert without.sink_rate(0) < 0.25 * with_bos.sink_rate(0)


@pytest.fixture(scope="module")
def trace(model):
    from tl_sinks.trace import trace_chain

    return trace_chain(model, tl_sinks.builtin_prompts(), lambdas=(1, 10, 30), batch_size=16, progress=False)


def test_ablating_the_super_neurons_weakens_disparity_and_sink(trace):
    links = trace.links.set_index("metric")
    rel = links["relative"]
    massive = [m for m in links.index if m.startswith("mean |x| of dim")][0]
    assert rel[massive] < -ABLATION_MASSIVE_DROP_MIN
    assert rel[[m for m in links.index if m.startswith("paper ratio")][0]] < 0
    assert rel[[m for m in links.index if m.startswith("sink rate")][0]] < -ABLATION_SINK_DROP_MIN


def test_the_trace_ablates_only_the_chain_super_neurons(trace, builtin_scan):
    # The two BOS super neurons (first token, channel-sparse), not the other high-ratio neurons;
    # the ablation links above are measured with these two alone.
    chain = builtin_scan.super_neurons.chain
    assert trace.neurons == [(int(r.layer), int(r.neuron)) for r in chain.itertuples()]
    assert set(trace.meta["ablated"]) == {"L0N504", "L2N168"} and trace.meta["ablation_selection"] == "chain"
    assert len(builtin_scan.super_neurons.found) > len(chain)


def _peak(trace, name: str, lam: float | None = None) -> float:
    p = trace.peak_received()
    row = p[(p["intervention"] == name) & (p["lam"].isna() if lam is None else p["lam"] == lam)]
    return float(row["peak_received"].iloc[0])


def test_plain_scaling_creates_no_sink(trace):
    # The paper's control: scaling token p's attention output does not make p a sink.
    assert _peak(trace, "scale_output", 30.0) < 0.3


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Not reproduced on the default model: its sink is keyed to the BOS token (test_the_sink_is_keyed_to_bos), and "
    "the self-only mask makes p exactly a first token without BOS (test_self_only_mask_makes_p_a_first_token_"
    "under_rotary_positions), on which this model puts no sink. Reproduced on a real decoder with a positional "
    "sink: tests/test_smollm2.py::test_self_only_mask_creates_a_sink_at_p. Strict: a default model that "
    "reproduces it turns this into a failure, and the assertion into a plain test."))
def test_self_only_mask_creates_a_sink_at_p(trace):
    base = _peak(trace, "none")
    assert _peak(trace, "self_only_mask") > max(0.3, 2 * base)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Not reproduced on the default model, nor on SmolLM2-135M-Instruct (peak attention to p 0.19 at lambda 5, "
    "0.106 at lambda 30 against plain scaling's 0.112: tests/test_smollm2.py::"
    "test_amplification_raises_attention_to_p_but_makes_no_sink). Strict: a model that reproduces the paper's "
    "amplification claim turns this into a failure, and the assertion into a plain test."))
def test_deviation_amplification_creates_a_sink_at_p(trace):
    base = _peak(trace, "none")
    assert _peak(trace, "amplify_deviation", 30.0) > max(0.3, 2 * base, 2 * _peak(trace, "scale_output", 30.0))
