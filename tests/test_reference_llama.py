"""Every stage against a hand-written Llama forward pass and metrics computed by plain loops.

The model is a random 2-layer Llama with grouped-query attention and rotary embeddings, loaded
from a local Hugging Face checkpoint through ``tl_sinks.load_model``. Prompts have ragged
lengths and are batched two at a time, so padding, growing per-position buffers and several
batches are all exercised; the reference runs each prompt alone, unpadded.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import tl_sinks
from tests.conftest import random_prompts
from tests.helpers import llama_reference, lower_median

LENGTHS = [12, 7, 9, 12, 3]
EPS = 0.3
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    sd = load_file(str(tiny_llama_dir / "model.safetensors"))
    prompts = random_prompts(LENGTHS, seed=11)
    return cfg, prompts, [llama_reference(sd, cfg, p) for p in prompts]


@pytest.fixture(scope="module")
def scanned(tiny_llama, reference):
    _, prompts, _ = reference
    # Thresholds low enough that the random model has Sun-massive events to count.
    return tl_sinks.scan(
        tiny_llama, prompts, batch_size=2, progress=False, abs_threshold=0.0, rel_threshold=2.5, eps=EPS
    )


def _close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected).double(), rtol=1e-4, atol=atol)


def test_sink_scores_match_reference(scanned, reference):
    cfg, prompts, refs = reference
    L, H, P = cfg.num_hidden_layers, cfg.num_attention_heads, max(LENGTHS)
    alpha_sum = torch.zeros(L, H, P, dtype=torch.float64)
    above = torch.zeros(L, H, P, dtype=torch.float64)
    uniform = torch.zeros(P, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    for ref, prompt in zip(refs, prompts):
        T = len(prompt)
        for k in range(T):
            n[k] += 1
            uniform[k] += sum(1.0 / (q + 1) for q in range(k, T)) / (T - k)
            for layer in range(L):
                for h in range(H):
                    a = sum(float(ref["pattern"][layer][h, q, k]) for q in range(k, T)) / (T - k)
                    alpha_sum[layer, h, k] += a
                    above[layer, h, k] += a > EPS
    s = scanned.sinks
    _close(s.n_prompts, n)
    _close(s.values, alpha_sum / n)
    _close(s.above_eps, above / n)
    _close(s.uniform, uniform / n)
    assert s.sink_rate(0) == pytest.approx(float((above / n)[:, :, 0].mean()), abs=1e-6)


def test_value_aggregation_matches_reference(scanned, reference):
    cfg, prompts, refs = reference
    L, H, P = cfg.num_hidden_layers, cfg.num_attention_heads, max(LENGTHS)
    D = cfg.hidden_size // H
    var = torch.zeros(L, H, P, dtype=torch.float64)
    rms = torch.zeros(L, H, P, dtype=torch.float64)
    var_all = torch.zeros(L, P, dtype=torch.float64)
    z_sum = torch.zeros(L, H, D, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    for ref, prompt in zip(refs, prompts):
        for p in range(len(prompt)):
            n[p] += 1
            for layer in range(L):
                z = ref["z"][layer][p]  # [H, D]
                for h in range(H):
                    vals = [float(v) for v in z[h]]
                    mu = sum(vals) / D
                    var[layer, h, p] += sum((v - mu) ** 2 for v in vals) / D
                    rms[layer, h, p] += math.sqrt(sum(v * v for v in vals) / D)
                flat = [float(v) for v in z.flatten()]
                mu = sum(flat) / len(flat)
                var_all[layer, p] += sum((v - mu) ** 2 for v in flat) / len(flat)
                z_sum[layer] += z
    agg = scanned.aggregation
    _close(agg.n_prompts, n)
    _close(agg.values, var / n)
    _close(agg.rms, rms / n)
    _close(agg.var_all_heads, var_all / n)
    _close(agg.mean_z, z_sum / sum(LENGTHS))
    # The headline ratio is the position-0 variance over the token-weighted mean of the rest.
    rest = (var[..., 1:]).sum(-1) / (sum(LENGTHS) - len(LENGTHS))
    _close(agg.first_rest_ratio().values, (var[..., 0] / n[0]) / rest)


def test_super_neuron_statistics_match_reference(scanned, reference, tiny_llama):
    cfg, prompts, refs = reference
    L, N = cfg.num_hidden_layers, cfg.intermediate_size
    first = torch.zeros(L, N, dtype=torch.float64)
    rest_sum = torch.zeros(L, N, dtype=torch.float64)
    rest_max = torch.zeros(L, N, dtype=torch.float64)
    peak = torch.zeros(L, N, dtype=torch.float64)
    where = {}
    for i, (ref, prompt) in enumerate(zip(refs, prompts)):
        for layer in range(L):
            post = ref["post"][layer]
            for neuron in range(N):
                col = post[:, neuron]
                first[layer, neuron] += abs(float(col[0]))
                rest_sum[layer, neuron] += sum(abs(float(v)) for v in col[1:])
                if len(col) > 1:
                    rest_max[layer, neuron] = max(rest_max[layer, neuron], max(abs(float(v)) for v in col[1:]))
                for pos, v in enumerate(col):
                    if abs(float(v)) > peak[layer, neuron]:
                        peak[layer, neuron] = abs(float(v))
                        where[layer, neuron] = (i, pos, prompt[pos], float(v))
    sn = scanned.super_neurons
    n_rest = sum(LENGTHS) - len(LENGTHS)
    _close(sn.first_mean_abs, first / len(LENGTHS))
    _close(sn.rest_mean_abs, rest_sum / n_rest)
    _close(sn.rest_max_abs, rest_max)
    _close(sn.max_abs, peak)
    for (layer, neuron), (_, _, _, value) in where.items():
        # The reported location must hold the peak (BOS rows tie exactly across prompts, so the
        # location itself is not unique).
        i, pos = int(sn.max_prompt[layer, neuron]), int(sn.max_pos[layer, neuron])
        assert int(sn.max_token[layer, neuron]) == prompts[i][pos]
        assert float(refs[i]["post"][layer][pos, neuron]) == pytest.approx(value, abs=ATOL)
        assert float(sn.max_value[layer, neuron]) == pytest.approx(value, abs=ATOL)
    ratio = torch.maximum(first / len(LENGTHS), rest_max) / (rest_sum / n_rest)
    _close(sn.values, ratio, atol=1e-3)


def test_dimension_disparity_matches_reference(scanned, reference):
    cfg, prompts, refs = reference
    L, P, Dm = cfg.num_hidden_layers, max(LENGTHS), cfg.hidden_size
    top1 = torch.zeros(L, P, dtype=torch.float64)
    med = torch.zeros(L, P, dtype=torch.float64)
    ratio_med = torch.zeros(L, P, dtype=torch.float64)
    paper = torch.zeros(L, P, dtype=torch.float64)
    attn_in = torch.zeros(L, P, dtype=torch.float64)
    sun = torch.zeros(L, P, dtype=torch.float64)
    top_dim_counts = torch.zeros(L, 2, Dm, dtype=torch.float64)
    first_mean = torch.zeros(L, Dm, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    comps = torch.zeros(1 + 2 * L, Dm, dtype=torch.float64)
    for ref, prompt in zip(refs, prompts):
        comps[0] += ref["embed"][0][0]
        for p in range(len(prompt)):
            n[p] += 1
            for layer in range(L):
                x = ref["resid_post"][layer][p].abs()
                t = float(x.max())
                m = float(lower_median(x))
                others = (float(x.sum()) - t) / (Dm - 1)
                top1[layer, p] += t
                med[layer, p] += m
                ratio_med[layer, p] += t / m
                paper[layer, p] += t / others
                # Sun criterion with the test's thresholds: |x| > 0 and > 2.5 x median.
                sun[layer, p] += t > 2.5 * m
                top_dim_counts[layer, 0 if p == 0 else 1, int(x.argmax())] += 1
                a = ref["attn_in"][layer][p].abs()
                attn_in[layer, p] += float(a.max()) / ((float(a.sum()) - float(a.max())) / (Dm - 1))
        for layer in range(L):
            first_mean[layer] += ref["resid_post"][layer][0]
            comps[1 + 2 * layer] += ref["attn_out"][layer][0]
            comps[2 + 2 * layer] += ref["mlp_out"][layer][0]
    d = scanned.disparity
    _close(d.n_prompts, n)
    _close(d.values, top1 / n)
    _close(d.median, med / n)
    _close(d.ratio_to_median, ratio_med / n, atol=1e-3)
    _close(d.paper_ratio, paper / n, atol=1e-4)
    _close(d.attn_in_paper_ratio, attn_in / n, atol=1e-4)
    _close(d.massive_fraction, sun / n)
    _close(d.top_dim_counts, top_dim_counts)
    _close(d.first_mean, first_mean / len(LENGTHS))
    _close(d.components, comps / len(LENGTHS))


def test_attribution_sums_to_residual(scanned):
    """Completeness: at position 0 the writers' contributions add up to the residual value."""
    d = scanned.disparity
    assert d.meta["attribution_exact"] is True
    L, Dm = d.first_mean.shape
    for layer in range(L):
        for dim in range(Dm):
            contrib = d.attribution(dim, layer)["contribution"].sum()
            assert contrib == pytest.approx(float(d.first_mean[layer, dim]), abs=1e-5)


def test_batching_does_not_change_results(tiny_llama, scanned, reference):
    """One prompt per batch (no padding at all) gives the same statistics as padded batches."""
    _, prompts, _ = reference
    single = tl_sinks.scan(tiny_llama, prompts, batch_size=1, progress=False, abs_threshold=0.0, rel_threshold=2.5)
    torch.testing.assert_close(single.sinks.values, scanned.sinks.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(single.aggregation.values, scanned.aggregation.values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(single.super_neurons.max_abs, scanned.super_neurons.max_abs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single.disparity.paper_ratio, scanned.disparity.paper_ratio, rtol=1e-5, atol=1e-5)
