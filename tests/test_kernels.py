"""Pure tensor kernels against brute force, invariants and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_sinks.aggregation import as_head_vector, head_output_spread
from tl_sinks.disparity import is_massive, token_disparity
from tl_sinks.sinks import attention_received, uniform_received
from tl_sinks.super_neurons import channel_concentration, excess_kurtosis


def random_pattern(lengths: list[int], n_heads: int, *, causal: bool, seed: int) -> torch.Tensor:
    """Right-padded softmax pattern; padded keys get no attention."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    scores = torch.randn(len(lengths), n_heads, P, P, generator=g) * 3
    q = torch.arange(P)
    mask = torch.zeros(len(lengths), 1, P, P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keep = q[None, :] < n
        if causal:
            keep = keep & (q[None, :] <= q[:, None])
        mask[b, 0] = keep
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)


def brute_received(pattern, lengths, causal, exclude_self):
    B, H, P, _ = pattern.shape
    alpha = torch.zeros(B, H, P, dtype=torch.float64)
    counts = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lengths):
        for k in range(n):
            qs = [q for q in range(n) if (q >= k or not causal) and not (exclude_self and q == k)]
            counts[b, k] = len(qs)
            for h in range(H):
                if qs:
                    alpha[b, h, k] = sum(float(pattern[b, h, q, k]) for q in qs) / len(qs)
    return alpha, counts


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("lengths", [[6, 3, 1, 5], [5, 5, 5]], ids=["padded", "unpadded"])
def test_attention_received_matches_brute_force(causal, exclude_self, lengths):
    pattern = random_pattern(lengths, 3, causal=causal, seed=1)
    # Padded query rows hold garbage in real models' patterns: it must never count.
    P = max(lengths)
    for b, n in enumerate(lengths):
        pattern[b, :, n:, :] = torch.rand(3, P - n, P) * 7
    alpha, counts = attention_received(pattern, torch.tensor(lengths), causal=causal, exclude_self=exclude_self)
    ref_alpha, ref_counts = brute_received(pattern, lengths, causal, exclude_self)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(alpha.double(), ref_alpha, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_uniform_baseline_equals_received_of_uniform_pattern(causal, exclude_self):
    """``uniform_received`` in closed form equals ``attention_received`` of an explicit uniform pattern."""
    lengths = [7, 2, 5]
    P = max(lengths)
    pattern = torch.zeros(len(lengths), 1, P, P)
    for b, n in enumerate(lengths):
        for q in range(n):
            keys = range(q + 1) if causal else range(n)
            for k in keys:
                pattern[b, 0, q, k] = 1.0 / len(keys)
    alpha, _ = attention_received(pattern, torch.tensor(lengths), causal=causal, exclude_self=exclude_self)
    u = uniform_received(torch.tensor(lengths), P, causal=causal, exclude_self=exclude_self)
    torch.testing.assert_close(u, alpha[:, 0], rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    causal=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_attention_received_is_a_mean_of_probabilities(lengths, causal, seed):
    pattern = random_pattern(lengths, 2, causal=causal, seed=seed)
    alpha, counts = attention_received(pattern, torch.tensor(lengths), causal=causal)
    assert bool((alpha >= -1e-7).all()) and bool((alpha <= 1 + 1e-6).all())
    # Padded keys receive nothing, and have no counted queries.
    P = max(lengths)
    pad = torch.arange(P)[None, :] >= torch.tensor(lengths)[:, None]
    assert bool((counts[pad] == 0).all()) and bool((alpha.permute(0, 2, 1)[pad] == 0).all())
    if not causal:
        # Bidirectional: every query's row sums to 1 over the real keys, so the mean received
        # summed over keys is exactly 1.
        torch.testing.assert_close(alpha.sum(-1), torch.ones(len(lengths), 2), rtol=1e-5, atol=1e-5)


def test_head_output_spread_matches_numpy():
    z = torch.randn(2, 3, 4, 8)
    var, rms = head_output_spread(z)
    zn = z.numpy().astype(np.float64)
    np.testing.assert_allclose(var.numpy(), zn.var(-1), rtol=1e-5)
    np.testing.assert_allclose(rms.numpy(), np.sqrt((zn**2).mean(-1)), rtol=1e-5)
    # A large common offset: E[z^2] - E[z]^2 would lose the variance to fp32 cancellation.
    z = torch.randn(2, 3, 4, 32) * 0.01 + 300.0
    var, _ = head_output_spread(z)
    np.testing.assert_allclose(var.numpy(), z.numpy().astype(np.float64).var(-1), rtol=1e-3)


def test_as_head_vector_reshapes_flat_hook_z():
    z = torch.randn(2, 3, 4, 5)
    assert torch.equal(as_head_vector(z.flatten(2), 4), z)
    with pytest.raises(ValueError, match="hook_z shape"):
        as_head_vector(torch.randn(2, 3, 7), 4)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(5, 200), seed=st.integers(0, 10_000))
def test_excess_kurtosis_matches_scipy(d, seed):
    w = torch.randn(d, generator=torch.Generator().manual_seed(seed)) ** 3
    assert float(excess_kurtosis(w)) == pytest.approx(float(scipy.stats.kurtosis(w.numpy().astype(np.float64))), rel=1e-4, abs=1e-4)


def test_excess_kurtosis_of_one_hot_row():
    d = 384
    w = torch.zeros(d)
    w[99] = 7.9
    assert float(excess_kurtosis(w)) == pytest.approx(d - 5 + 1 / (d - 1), rel=1e-6)


def test_channel_concentration_brute_force():
    w = torch.tensor([0.1, -3.0, 2.0, 0.0, 0.5])
    c = channel_concentration(w, k=2, mass=0.9)
    total = float((w**2).sum())
    assert c["top_dims"] == [1, 2]
    assert c["top_weights"] == [-3.0, 2.0]
    assert c["top1_share"] == pytest.approx(9.0 / total)
    assert c["topk_share"] == pytest.approx(13.0 / total)
    # 9/13.26 = 0.68 < 0.9; (9+4)/13.26 = 0.98 >= 0.9
    assert c["dims_for_mass"] == 2


def test_token_disparity_brute_force():
    x = torch.randn(3, 4, 10) * 0.01
    x[0, 0, 7] = -500.0  # > 100 and > 1000x the token's median |x| (about 0.007)
    s = token_disparity(x, k=2)
    for b in range(3):
        for p in range(4):
            a = sorted((abs(float(v)), i) for i, v in enumerate(x[b, p]))
            assert int(s["top_dims"][b, p, 0]) == a[-1][1]
            assert float(s["top_values"][b, p, 1]) == pytest.approx(a[-2][0])
            assert float(s["median"][b, p]) == pytest.approx(a[(10 - 1) // 2][0])
            assert float(s["rest_mean"][b, p]) == pytest.approx(sum(v for v, _ in a[:-1]) / 9, rel=1e-5)
    assert bool(is_massive(s["top_values"][0, 0, 0], s["median"][0, 0]))
    assert not bool(is_massive(s["top_values"][1, 1, 0], s["median"][1, 1]))


@pytest.mark.parametrize("d", [1, 2, 7, 64, 385])
def test_lower_median_matches_sorting(d):
    from tl_sinks.disparity import lower_median

    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 5, d, generator=g).abs()
    x[0, 0] = 1.0  # all ties
    ref = x.sort(-1).values[..., (d - 1) // 2]
    assert torch.equal(lower_median(x), ref)
    assert torch.equal(lower_median(x.double()), ref.double())
