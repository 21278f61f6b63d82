"""Planted-answer models: the answer is put in by hand, the scan must find it without being told.

* Sinks are planted with bare TransformerLens hooks (no tl_sinks code) that add a large constant
  to the pre-softmax scores of chosen keys.
* The super neuron and the massive dimension are planted in the weights of
  ``planted_llama_dir`` (see ``conftest.py``), so they arise in a genuine forward pass.
"""

from __future__ import annotations

import pytest
import torch

import tl_sinks
from tests.conftest import PLANT, random_prompts
from tests.helpers import N_SPECIAL

SINK_LAYER, SINK_HEAD = 1, 2
DELIM = 9  # token id of the planted secondary sink ("w5")
BOOST = 12.0


def _plant_first_token_sink(scores, hook):
    scores = scores.clone()
    scores[:, SINK_HEAD, :, 0] += BOOST
    return scores


def _plant_delimiter_sink(tokens):
    def hook(scores, hook):
        scores = scores.clone()
        is_delim = (tokens == DELIM)[:, None, None, :]  # [batch, 1, 1, key_pos]
        return scores + BOOST * is_delim

    return hook


def _long_prompts(n: int = 12, length: int = 28, seed: int = 0) -> torch.Tensor:
    # Ordinary tokens only (ids >= 10), so the delimiter appears only where placed.
    return torch.tensor(random_prompts([length] * n, seed=seed, low=10))


def test_planted_first_token_sink_is_recovered(tiny_llama):
    tokens = _long_prompts()
    name = f"blocks.{SINK_LAYER}.attn.hook_attn_scores"
    baseline = tl_sinks.compute_sink_scores(tiny_llama, tokens)
    with tiny_llama.hooks(fwd_hooks=[(name, _plant_first_token_sink)]):
        scores = tl_sinks.compute_sink_scores(tiny_llama, tokens)
    # Exactly the planted head is a sink head; the random model has none of its own.
    assert baseline.heads(0) == []
    assert scores.heads(0) == [(SINK_LAYER, SINK_HEAD)]
    assert float(scores.values[SINK_LAYER, SINK_HEAD, 0]) > 0.95
    n_heads = tiny_llama.cfg.n_layers * tiny_llama.cfg.n_heads
    assert scores.sink_rate(0) == pytest.approx(1 / n_heads)
    assert scores.sink_rate_by_layer(0).values.tolist() == [0.0, pytest.approx(1 / tiny_llama.cfg.n_heads)]
    assert baseline.sink_rate(0) == 0.0


def test_planted_delimiter_sink_is_detected_by_token(tiny_llama):
    tokens = _long_prompts(seed=3)
    g = torch.Generator().manual_seed(0)
    # The delimiter sits at a different position in every prompt.
    positions = torch.randint(3, tokens.shape[1] - 4, (tokens.shape[0],), generator=g)
    tokens[torch.arange(tokens.shape[0]), positions] = DELIM
    name = f"blocks.{SINK_LAYER}.attn.hook_attn_scores"
    with tiny_llama.hooks(fwd_hooks=[(name, _plant_delimiter_sink(tokens))]):
        # One batch, so the planting hook's token tensor lines up with the batch.
        scores = tl_sinks.compute_sink_scores(tiny_llama, tokens, batch_size=len(tokens))
    found = scores.detect_sinks()
    tok_rows = found[found["kind"] == "token"]
    assert tok_rows["token"].tolist() == [DELIM]
    assert tok_rows["str_token"].iloc[0] == f"w{DELIM - N_SPECIAL}"
    # Every head of the planted layer (half of all heads) attends to the delimiter.
    assert tok_rows["sink_rate"].iloc[0] == pytest.approx(0.5)
    assert int(tok_rows["count"].iloc[0]) == tokens.shape[0]


def test_planted_super_neuron_and_massive_dim_are_found(planted_llama):
    prompts = random_prompts([20] * 10, seed=5, low=10)
    result = tl_sinks.scan(planted_llama, prompts, progress=False)
    sn = result.super_neurons.found
    assert sn["label"].tolist() == [f"L{PLANT['layer']}N{PLANT['neuron']}"]
    row = sn.iloc[0]
    assert row["max_pos"] == 0
    assert row["top_dims"][0] == PLANT["massive_dim"]
    assert row["top1_share"] == pytest.approx(1.0)
    d_model = planted_llama.cfg.d_model
    assert row["down_kurtosis"] == pytest.approx(d_model - 5 + 1 / (d_model - 1), rel=1e-4)
    md = result.disparity.massive_dims()
    first = md[md["pos_class"] == "first"]
    assert first["dim"].tolist() == [PLANT["massive_dim"]]
    assert int(first["first_layer"].iloc[0]) == PLANT["layer"]
    assert int(first["last_layer"].iloc[0]) == planted_llama.cfg.n_layers - 1
    assert first["writer"].iloc[0] == f"{PLANT['layer']}_mlp_out"
    assert md[md["pos_class"] == "rest"].empty
    summary = result.summary()
    assert summary["massive_dim_pos0"] == PLANT["massive_dim"]
    assert summary["super_neuron_writes_massive_dim"] is True
    # Before the planted layer the dim is ordinary; from it on, massive.
    fm = result.disparity.first_mean_abs[:, PLANT["massive_dim"]]
    assert float(fm[PLANT["layer"] - 1]) < 1.0
    assert float(fm[PLANT["layer"]]) > 100.0


def test_ablating_the_planted_neuron_removes_the_massive_dim(planted_llama):
    """Causal check with a bare TL hook: zero the neuron, the massive dim disappears."""
    prompts = random_prompts([20] * 6, seed=6, low=10)

    def ablate(post, hook):
        post = post.clone()
        post[..., PLANT["neuron"]] = 0.0
        return post

    with planted_llama.hooks(fwd_hooks=[(f"blocks.{PLANT['layer']}.mlp.hook_post", ablate)]):
        ablated = tl_sinks.compute_dimension_disparity(planted_llama, prompts)
    assert ablated.massive_dims().empty
    assert float(ablated.first_mean_abs[:, PLANT["massive_dim"]].max()) < 1.0


def test_no_super_neurons_gives_an_empty_table_with_every_column(tiny_gpt2, planted_llama):
    """Code that selects the down-row columns works on a model with no super neurons too."""
    prompts = random_prompts([10, 10, 10, 10])
    none = tl_sinks.find_super_neurons(tiny_gpt2, prompts, min_ratio=1e12, progress=False).found
    some = tl_sinks.find_super_neurons(planted_llama, prompts, progress=False).found
    assert none.empty and len(some) > 0
    assert list(none.columns) == list(some.columns)
    w = tl_sinks.find_super_neurons_by_weights(tiny_gpt2, top_k=0).found
    assert w.empty and {"down_kurtosis", "top_dims", "top1_share"} <= set(w.columns)
