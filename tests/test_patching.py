"""Batched patching equals transformer_lens.patching, one forward per patch, on the same inputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

from tests.conftest import random_prompts
from tl_sinks.patching import (
    attention_to_metric,
    get_act_patch_sink_kv_by_pos,
    get_act_patch_sink_neurons,
    logit_diff_metric,
    patch_sweep,
)


@pytest.fixture(scope="module")
def pair(tiny_llama):
    clean = torch.tensor(random_prompts([7, 7, 7], seed=20))
    corrupted = clean.clone()
    corrupted[:, 3] = torch.tensor([40, 41, 42])  # one changed token per prompt
    metric = logit_diff_metric(torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22]))
    _, cache = tiny_llama.run_with_cache(clean)
    return clean, corrupted, cache, metric


def _tl(fn, model, corrupted, cache, metric):
    out = fn(model, corrupted, cache, metric, reduce="none")
    return out.values if hasattr(out, "values") else out


@pytest.mark.parametrize(
    ("site", "all_pos", "tl_fn"),
    [
        ("resid_pre", False, tlp.get_act_patch_resid_pre),
        ("attn_out", False, tlp.get_act_patch_attn_out),
        ("mlp_out", False, tlp.get_act_patch_mlp_out),
        ("z", False, tlp.get_act_patch_attn_head_out_by_pos),
        ("z", True, tlp.get_act_patch_attn_head_out_all_pos),
        ("q", False, tlp.get_act_patch_attn_head_q_by_pos),
        ("k", False, tlp.get_act_patch_attn_head_k_by_pos),
        ("v", False, tlp.get_act_patch_attn_head_v_by_pos),
        ("v", True, tlp.get_act_patch_attn_head_v_all_pos),
    ],
)
def test_patch_sweep_matches_transformer_lens(tiny_llama, pair, site, all_pos, tl_fn):
    clean, corrupted, cache, metric = pair
    ours = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, all_pos=all_pos, patches_per_forward=5)
    ref = _tl(tl_fn, tiny_llama, corrupted, cache, metric)
    assert tuple(ours.values.shape) == tuple(ref.shape)
    torch.testing.assert_close(ours.values, ref.float().cpu(), rtol=1e-4, atol=1e-5)


def test_kv_patching_is_per_key_value_head(tiny_llama, pair):
    clean, corrupted, cache, metric = pair
    r = get_act_patch_sink_kv_by_pos(tiny_llama, corrupted, clean, metric, which="k")
    assert r.dims == ("layer", "pos", "kv_head_index", "batch")
    assert r.values.shape[2] == tiny_llama.cfg.n_key_value_heads == 2
    # Patching one kv head by hand with a bare hook gives the same numbers.
    layer, pos, head = 1, 3, 1

    def bare(k, hook):
        k = k.clone()
        k[:, pos, head] = cache[f"blocks.{layer}.attn.hook_k"][:, pos, head]
        return k

    with tiny_llama.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_k", bare)]):
        expected = metric(tiny_llama(corrupted))
    torch.testing.assert_close(r.values[layer, pos, head], expected, rtol=1e-5, atol=1e-6)


def test_batched_equals_one_patch_per_forward(tiny_llama, pair):
    clean, corrupted, _, metric = pair
    a = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", patches_per_forward=1)
    b = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", patches_per_forward=14)
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)


def test_clean_into_clean_and_corrupted_into_corrupted(tiny_llama, pair):
    clean, corrupted, _, metric = pair
    same = patch_sweep(tiny_llama, clean, clean, metric, site="resid_pre")
    torch.testing.assert_close(same.values, same.clean.expand_as(same.values), rtol=1e-5, atol=1e-6)
    none = patch_sweep(tiny_llama, corrupted, corrupted, metric, site="z")
    torch.testing.assert_close(none.values, none.corrupted.expand_as(none.values), rtol=1e-5, atol=1e-6)
    # Patching the whole residual stream at the first layer restores the clean run exactly.
    full = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", all_pos=True)
    torch.testing.assert_close(full.values[0], full.clean, rtol=1e-5, atol=1e-5)
    n = full.normalized().values
    assert float(n[0]) == pytest.approx(1.0, abs=1e-4)


def test_neuron_patching_with_an_index(tiny_llama, pair):
    clean, corrupted, cache, metric = pair
    r = get_act_patch_sink_neurons(tiny_llama, corrupted, clean, metric, neurons=[(1, 5), (0, 9)], positions=[0, 3])
    assert r.dims == ("patch", "batch") and len(r.index) == 4
    idx = pd.DataFrame({"layer": [1, 0], "pos": [3, 0], "neuron": [5, 9]})
    ref = tlp.generic_activation_patch(
        tiny_llama, corrupted, cache, metric, patch_setter=tlp.layer_pos_head_vector_patch_setter,
        activation_name="post", index_df=idx, reduce="none",
    )
    ours = patch_sweep(tiny_llama, corrupted, clean, metric, site="post", index=idx)
    torch.testing.assert_close(ours.values, ref.values.float(), rtol=1e-4, atol=1e-5)


def test_metric_on_an_attention_pattern(tiny_llama, pair):
    clean, corrupted, _, _ = pair
    metric = attention_to_metric(0)
    r = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", metric_site="blocks.1.attn.hook_pattern")
    # Patching after the read-out layer cannot change it; position 3 before it can.
    torch.testing.assert_close(r.values[1, :3], r.corrupted.expand(3, -1), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(r.values[0, 3], r.corrupted)


def test_patching_errors(tiny_llama, pair):
    clean, corrupted, _, metric = pair
    with pytest.raises(ValueError, match="unknown site"):
        patch_sweep(tiny_llama, corrupted, clean, metric, site="resid")
    with pytest.raises(ValueError, match=r"\[batch\] tensor"):
        patch_sweep(tiny_llama, corrupted, clean, lambda logits: logits.mean(), site="resid_pre")
    with pytest.raises(ValueError, match="differ in shape"):
        patch_sweep(tiny_llama, corrupted, clean[:, :5], metric, site="resid_pre")
    with pytest.raises(ValueError, match="out of range"):
        patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", index=pd.DataFrame({"layer": [5], "pos": [0]}))


@pytest.mark.parametrize("site", ["resid_pre", "z", "k", "post"])
def test_prefix_reuse_equals_full_forward_passes(tiny_llama, pair, site):
    clean, corrupted, _, metric = pair
    fast = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, patches_per_forward=4)
    full = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, patches_per_forward=4, reuse_prefix=False)
    assert fast.meta["prefix_reuse"] is True and full.meta["prefix_reuse"] is False
    torch.testing.assert_close(fast.values, full.values, rtol=1e-4, atol=1e-5)
    # Patches before the changed token (position 3) restore nothing: exactly the corrupted metric
    # up to float rounding, whichever path computed them.
    torch.testing.assert_close(fast.values[:, :3].reshape(-1, 3), fast.corrupted.expand(fast.values[:, :3].reshape(-1, 3).shape[0], -1), rtol=1e-4, atol=1e-5)


def test_prefix_reuse_is_refused_where_it_would_be_wrong(tiny_llama, pair):
    clean, corrupted, _, _ = pair
    metric = attention_to_metric(0)
    r = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", metric_site="blocks.1.attn.hook_pattern")
    assert r.meta["prefix_reuse"] is False and "hook activation" in r.meta["prefix_reuse_unavailable"]
    with pytest.raises(ValueError, match="reuse_prefix=True is not possible"):
        patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", metric_site="blocks.1.attn.hook_pattern", reuse_prefix=True)
    with pytest.raises(ValueError, match="every position at once"):
        patch_sweep(tiny_llama, corrupted, clean, logit_diff_metric(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])),
                    site="z", all_pos=True, reuse_prefix=True)


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out", "v"])
def test_layer_skipping_equals_full_forward_passes(tiny_llama, pair, site, monkeypatch):
    from tl_sinks import patching

    clean, corrupted, _, metric = pair
    monkeypatch.setattr(patching, "forward_overhead", lambda model: 0.0)  # so the planner splits by layer
    fast = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, skip_unchanged=False)
    slow = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, skip_layers=False, reuse_prefix=False,
                       skip_unchanged=False)
    assert fast.meta["layer_skip"] is True and fast.meta["block_rows_skipped"] > 0
    assert slow.meta["layer_skip"] is False and slow.meta["block_rows_skipped"] == 0
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("layers_per_group", "groups_per_layer"), [(1, 1), (2, 3), (3, 7), (1, 7)])
def test_every_chunking_plan_gives_the_same_numbers(tiny_llama, pair, monkeypatch, layers_per_group, groups_per_layer):
    # The planner picks a chunking from timings; force each shape (passes spanning several layers
    # start at the first of them, passes spanning positions at the first) and compare.
    from tl_sinks import patching

    clean, corrupted, _, metric = pair
    slow = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", skip_layers=False, reuse_prefix=False,
                       skip_unchanged=False)

    def forced(rows, k_max, *, by_pos, n_pos, **_):
        return patching._plan_chunks(rows, k_max, by_pos=by_pos, n_pos=n_pos, groups_per_layer=groups_per_layer,
                                     layers_per_group=layers_per_group)

    monkeypatch.setattr(patching, "_best_plan", forced)
    fast = patch_sweep(tiny_llama, corrupted, clean, metric, site="resid_pre", patches_per_forward=6, skip_unchanged=False)
    n_layers = tiny_llama.cfg.n_layers
    n_groups = -(-n_layers // layers_per_group)
    assert fast.meta["n_forwards"] >= n_groups * min(groups_per_layer, 7)
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("site", "all_pos"), [("resid_pre", False), ("z", False), ("v", True), ("post", False), ("mlp_out", True)])
def test_unchanged_patches_are_skipped_exactly(tiny_llama, pair, site, all_pos):
    clean, corrupted, _, metric = pair
    fast = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, all_pos=all_pos)
    full = patch_sweep(tiny_llama, corrupted, clean, metric, site=site, all_pos=all_pos, skip_unchanged=False)
    torch.testing.assert_close(fast.values, full.values, rtol=1e-4, atol=1e-5)
    n = fast.meta["n_unchanged_skipped"]
    assert full.meta["n_unchanged_skipped"] == 0
    n_layers = tiny_llama.cfg.n_layers
    per_pos = 1 if all_pos else fast.values[0, 0].numel() // fast.values.shape[-1]  # heads/neurons per position
    # Expected from the causal structure alone: the corruption is at position 3 of 7, so every
    # patch before it, at every layer, is a no-op; so is every other position of block 0's
    # residual input (the embedding sees one token). Nothing else is.
    if all_pos:
        expected = 0
    else:
        expected = n_layers * 3 * per_pos + (3 if site == "resid_pre" else 0)
    assert n == expected
    # Another clean batch (prompts rolled) agrees with the corrupted one only at BOS.
    other = torch.roll(clean, 1, dims=0)
    r = patch_sweep(tiny_llama, corrupted, other, metric, site=site, all_pos=all_pos)
    assert r.meta["n_unchanged_skipped"] == (0 if all_pos else n_layers * per_pos)


def test_plan_chunks_cover_every_patch_once():
    from tl_sinks.patching import _plan_chunks

    rows = torch.tensor([(layer, pos) for layer in range(4) for pos in range(10)])
    for h in (1, 2, 3, 4):
        for g in (1, 3, 10):
            plan = _plan_chunks(rows, 7, by_pos=True, n_pos=10, groups_per_layer=g, layers_per_group=h)
            ids = torch.cat(plan)
            assert sorted(ids.tolist()) == list(range(len(rows)))
            assert all(len(c) <= 7 for c in plan)
            # a pass never mixes layers from different groups
            assert all(len(set((rows[c, 0] // h).tolist())) == 1 for c in plan)


def test_layer_skipping_with_a_metric_site(tiny_llama, pair):
    clean, corrupted, _, _ = pair
    kw = dict(site="resid_pre", metric_site="blocks.1.attn.hook_pattern")
    fast = patch_sweep(tiny_llama, corrupted, clean, attention_to_metric(0), **kw)
    slow = patch_sweep(tiny_llama, corrupted, clean, attention_to_metric(0), skip_layers=False, **kw)
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_bert"])
def test_other_architectures_match_transformer_lens(request, model_name):
    model = request.getfixturevalue(model_name)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(5, model.cfg.d_vocab, (2, 6), generator=g)
    clean[:, 0] = 1
    corrupted = clean.clone()
    corrupted[:, 2] = 4
    metric = logit_diff_metric(torch.tensor([7, 8]), torch.tensor([9, 10]), pos=-1)
    _, cache = model.run_with_cache(clean)
    ours = patch_sweep(model, corrupted, clean, metric, site="resid_pre", patches_per_forward=4)
    ref = _tl(tlp.get_act_patch_resid_pre, model, corrupted, cache, metric)
    torch.testing.assert_close(ours.values, ref.float().cpu(), rtol=1e-4, atol=1e-5)
    assert ours.meta["prefix_reuse"] is (model_name == "tiny_gpt2")  # BERT is bidirectional
    # Skipping blocks does not reproduce BERT's forward (its self-check refuses it); GPT-2's does.
    assert ours.meta["layer_skip"] is (model_name == "tiny_gpt2")


def test_blocks_are_restored_when_the_metric_raises(tiny_llama, pair):
    clean, corrupted, _, _ = pair
    blocks = list(tiny_llama.blocks)
    n_hooks = sum(len(hp.fwd_hooks) for hp in set(tiny_llama.hook_dict.values()))
    calls = []

    def bad_metric(logits):
        calls.append(1)
        if len(calls) > 3:  # fail inside the sweep, after the clean and corrupted runs
            raise RuntimeError("boom")
        return logits[:, -1, 0]

    with pytest.raises(RuntimeError, match="boom"):
        patch_sweep(tiny_llama, corrupted, clean, bad_metric, site="resid_pre", patches_per_forward=2)
    assert all(a is b for a, b in zip(tiny_llama.blocks, blocks)) and len(tiny_llama.blocks) == len(blocks)
    assert sum(len(hp.fwd_hooks) for hp in set(tiny_llama.hook_dict.values())) == n_hooks
