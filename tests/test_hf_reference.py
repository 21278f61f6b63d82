"""GPT-2 and BERT (random, from configs) against Hugging Face's own forward pass.

Hugging Face eager attention weights, hidden states and torch forward hooks on the original
modules are an implementation independent of TransformerLens' hook points.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import tl_sinks
from tests.conftest import random_prompts
from tests.helpers import lower_median

LENGTHS = [10, 6, 8]


def _received_by_loops(attentions, lengths, causal):
    L = len(attentions[0])
    H = attentions[0][0].shape[1]
    P = max(lengths)
    total = torch.zeros(L, H, P, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    for att, T in zip(attentions, lengths):
        for k in range(T):
            n[k] += 1
            qs = range(k, T) if causal else range(T)
            for layer in range(L):
                total[layer, :, k] += sum(att[layer][0, :, q, k].double() for q in qs) / len(qs)
    return total / n


def test_gpt2_stages_match_hugging_face(tiny_gpt2, tiny_gpt2_dir):
    prompts = random_prompts(LENGTHS, seed=7)
    result = tl_sinks.scan(tiny_gpt2, prompts, batch_size=2, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()
    posts: dict[int, torch.Tensor] = {}
    handles = [
        block.mlp.c_proj.register_forward_hook(lambda m, args, out, i=i: posts.__setitem__(i, args[0].detach()))
        for i, block in enumerate(hf.transformer.h)
    ]
    attentions, hidden, post_all = [], [], []
    try:
        for p in prompts:
            with torch.no_grad():
                out = hf(torch.tensor([p]), output_attentions=True, output_hidden_states=True)
            attentions.append(out.attentions)
            hidden.append(out.hidden_states)
            post_all.append(dict(posts))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(result.sinks.values.double(), _received_by_loops(attentions, LENGTHS, True), rtol=1e-4, atol=1e-6)
    # Super-neuron peaks: the c_proj input (GELU output) seen by a torch hook on HF's module.
    L = len(hf.transformer.h)
    peak = torch.stack([torch.stack([pa[layer][0].abs().amax(0) for pa in post_all]).amax(0) for layer in range(L)])
    torch.testing.assert_close(result.super_neurons.max_abs, peak, rtol=1e-5, atol=1e-6)
    # Residual stream after block l is hidden_states[l + 1] (the last one has ln_f applied).
    for layer in range(L - 1):
        top, med = [], []
        for T, hs in zip(LENGTHS, hidden):
            x = hs[layer + 1][0].abs()
            top.append(x.amax(-1))
            med.append(lower_median(x))
        n = torch.tensor([sum(T > p for T in LENGTHS) for p in range(max(LENGTHS))], dtype=torch.float64)
        top_mean = torch.zeros(max(LENGTHS), dtype=torch.float64)
        med_mean = torch.zeros(max(LENGTHS), dtype=torch.float64)
        for t, m in zip(top, med):
            top_mean[: len(t)] += t.double()
            med_mean[: len(m)] += m.double()
        torch.testing.assert_close(result.disparity.values[layer].double(), top_mean / n, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.disparity.median[layer].double(), med_mean / n, rtol=1e-5, atol=1e-6)


def test_bert_padded_batches_match_hugging_face(tiny_bert, tiny_bert_dir):
    """Bidirectional attention over padded batches: the mask keeps padding out of every average."""
    texts = ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
    result = tl_sinks.scan(tiny_bert, texts, batch_size=3, progress=False)
    info = tl_sinks.inspect_model(tiny_bert)
    assert (info.causal, info.post_ln, info.first_token_id) == (False, True, 1)
    assert result.sinks.meta["attention"] == "bidirectional"
    hf = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="eager").eval()
    attentions, lengths = [], []
    for t in texts:
        ids = tiny_bert.to_tokens(t)
        lengths.append(ids.shape[1])
        with torch.no_grad():
            attentions.append(hf(ids, output_attentions=True).attentions)
    expected = _received_by_loops(attentions, lengths, causal=False)
    torch.testing.assert_close(result.sinks.values.double(), expected, rtol=1e-4, atol=1e-6)
    # Uniform attention over n keys gives 1/n to each.
    n = torch.tensor([sum(T > p for T in lengths) for p in range(max(lengths))])
    u = torch.tensor([sum(1 / T for T in lengths if T > p) for p in range(max(lengths))]) / n
    torch.testing.assert_close(result.sinks.uniform.double(), u.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_plain_mlp_weight_finder_runs(request, fixture):
    model = request.getfixturevalue(fixture)
    w = tl_sinks.find_super_neurons_by_weights(model, top_k=2)
    assert w.values.shape == (model.cfg.n_layers, model.cfg.d_mlp)
    assert torch.isnan(w.gate_norm).all()  # no gate in a plain MLP
    assert len(w.found) == 2 * model.cfg.n_layers
    # Independent: the norm of each neuron's input weights, straight from the module.
    torch.testing.assert_close(w.up_norm[0], model.blocks[0].mlp.W_in.detach().norm(dim=0))
