"""Every patching shortcut proves itself: faults injected into each one are caught at run time,
and patch_sweep still returns the numbers of plain full forward passes (one patch per pass)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch

from tests.conftest import random_prompts
from tl_sinks import patching
from tl_sinks.patching import clear_self_checks, logit_diff_metric, patch_sweep

PLAIN = dict(reuse_prefix=False, skip_layers=False, skip_unchanged=False, patches_per_forward=1)


@pytest.fixture(scope="module")
def pair():
    clean = torch.tensor(random_prompts([7, 7, 7], seed=20))
    corrupted = clean.clone()
    corrupted[:, 3] = torch.tensor([40, 41, 42])
    metric = logit_diff_metric(torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22]))
    return clean, corrupted, metric


@pytest.fixture(autouse=True)
def _fresh_checks(tiny_llama, tiny_gpt2):
    # The models are shared by the session: forget earlier verdicts before and after each test.
    clear_self_checks()
    yield
    clear_self_checks()


def _plain(model, pair, site):
    clean, corrupted, metric = pair
    return patch_sweep(model, corrupted, clean, metric, site=site, **PLAIN)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_shortcuts_pass_their_self_check_on_the_installed_stack(request, pair, model_name, site):
    # The check that caught transformers 5.24: the KV cache must reach TransformerLens' attention.
    model = request.getfixturevalue(model_name)
    clean, corrupted, metric = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fast = patch_sweep(model, corrupted, clean, metric, site=site, patches_per_forward=4, self_check="always")
    check = fast.meta["self_check"]
    assert check["failed"] == [] and check["n_sampled"] >= 2 and check["n_forwards"] >= 2
    assert set(check["checked"]) == {"prefix_reuse", "layer_skip", "skip_unchanged", "batching"}
    torch.testing.assert_close(fast.values, _plain(model, pair, site).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_the_prefix_cache_holds_the_prefix(request, model_name):
    # Root cause of the 5.24 break, tested directly: a pass that starts at p from the cached
    # prefix gives the full pass' logits (it got an empty cache and attended to >= p only).
    model = request.getfixturevalue(model_name)
    tokens = torch.tensor(random_prompts([9, 9], seed=5)).to(next(model.parameters()).device)
    sweep = patching._Sweep(
        model=model, site="resid_pre", all_pos=False, rows=torch.zeros(0, 2, dtype=torch.long), n_layers=model.cfg.n_layers,
        tokens=tokens, mask=None, metric=lambda x: x[:, -1, 0], metric_site=None, clean_acts={}, corrupted_out=torch.empty(0),
        corrupted_acts={}, skipper=None, overhead=0.0, per_row=0.0,
    )
    cache = patching._compute_prefix_cache(sweep, 4)
    assert cache.get_seq_length() == 4
    with torch.no_grad():
        full = model(tokens)
        tail = patching._run(sweep, tokens[:, 4:], [], 1, **patching._cache_kwargs(model, cache))
    torch.testing.assert_close(tail, full[:, 4:], rtol=1e-4, atol=1e-5)


def _expect_fallback(model, pair, site, failed, **kw):
    clean, corrupted, metric = pair
    with pytest.warns(RuntimeWarning, match=rf"the {failed} shortcut failed its self-check"):
        r = patch_sweep(model, corrupted, clean, metric, site=site, self_check="always", **kw)
    assert r.meta["self_check"]["failed"] == [failed]
    assert r.meta["self_check"]["max_abs_diff"] > r.meta["self_check"]["tolerance"]
    torch.testing.assert_close(r.values, _plain(model, pair, site).values, rtol=1e-4, atol=1e-5)
    return r


@pytest.mark.parametrize("site", ["resid_pre", "k"])
def test_a_broken_prefix_cache_falls_back_to_full_passes(tiny_llama, pair, site, monkeypatch):
    real = patching._compute_prefix_cache

    def wrong_prompts(sweep, p0):  # keys and values of the other prompts' prefixes
        import dataclasses

        return real(dataclasses.replace(sweep, tokens=sweep.tokens.flip(0)), p0)

    monkeypatch.setattr(patching, "_compute_prefix_cache", wrong_prompts)
    r = _expect_fallback(tiny_llama, pair, site, "prefix_reuse", patches_per_forward=4)
    assert r.meta["prefix_reuse"] is False and r.meta["layer_skip"] is True


def test_broken_block_skipping_falls_back(tiny_llama, pair, monkeypatch):
    clean, corrupted, metric = pair
    patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre")  # finds and self-checks the skipper first
    clear_self_checks()

    @contextmanager
    def one_too_many(self, n):  # also swaps out the block the pass should start at
        saved = [self.layers[i] for i in range(min(n + 1, len(self.layers)))]
        try:
            for i in range(len(saved)):
                self.layers[i] = patching._Identity()
            yield
        finally:
            for i, block in enumerate(saved):
                self.layers[i] = block

    monkeypatch.setattr(patching._BlockSkipper, "skip", one_too_many)
    monkeypatch.setattr(patching, "forward_overhead", lambda model: 0.0)  # so passes start at layer 1
    r = _expect_fallback(tiny_llama, pair, "mlp_out", "layer_skip", skip_unchanged=False)
    assert r.meta["layer_skip"] is False and r.meta["block_rows_skipped"] == 0
    assert all(not isinstance(b, patching._Identity) for b in tiny_llama.blocks)


def test_wrong_noop_detection_falls_back(tiny_llama, pair, monkeypatch):
    monkeypatch.setattr(patching, "_unchanged_rows", lambda rows, *a, **k: torch.ones(len(rows), dtype=torch.bool))
    r = _expect_fallback(tiny_llama, pair, "resid_pre", "skip_unchanged")
    assert r.meta["n_unchanged_skipped"] == 0


def test_mixed_up_batch_copies_fall_back(tiny_llama, pair, monkeypatch):
    real = patching._per_copy
    monkeypatch.setattr(patching, "_per_copy", lambda sweep, x, K: real(sweep, x, K).flip(0))
    r = _expect_fallback(tiny_llama, pair, "z", "batching", patches_per_forward=5)
    assert r.meta["patches_per_forward"] == 1


def test_verdicts_are_remembered(tiny_llama, pair, monkeypatch):
    clean, corrupted, metric = pair
    first = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre")
    again = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre")
    assert first.meta["self_check"]["cached"] is False and first.meta["self_check"]["n_forwards"] > 0
    assert again.meta["self_check"]["cached"] is True and again.meta["self_check"]["n_forwards"] == 0
    # A new input shape is checked afresh.
    longer = patch_sweep(tiny_llama, torch.cat([corrupted, corrupted[:, :2]], 1), torch.cat([clean, clean[:, :2]], 1), metric,
                         site="resid_pre")
    assert longer.meta["self_check"]["cached"] is False
    # A failure is remembered: the next sweep skips the shortcut at once, and still says why.
    monkeypatch.setattr(patching, "_unchanged_rows", lambda rows, *a, **k: torch.ones(len(rows), dtype=torch.bool))
    clear_self_checks(tiny_llama)
    with pytest.warns(RuntimeWarning, match="skip_unchanged shortcut failed"):
        patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre")
    with pytest.warns(RuntimeWarning, match="failed its self-check earlier in this process"):
        later = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre")
    assert later.meta["n_unchanged_skipped"] == 0 and later.meta["self_check"]["failed"] == ["skip_unchanged"]


def test_self_check_argument_is_validated(tiny_llama, pair):
    clean, corrupted, metric = pair
    with pytest.raises(ValueError, match="self_check must be"):
        patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", self_check="never")
