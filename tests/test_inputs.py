"""Bad input gets a clear error, never a wrong number; padding is handled through the mask."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import TransformerBridge, TransformerBridgeConfig

import tl_sinks
from tests.conftest import random_prompts
from tests.helpers import BOS, PAD, word
from tl_sinks.hooks import _n_hook_fns


def test_text_prompts_are_tokenised_with_bos(tiny_llama):
    r = tl_sinks.compute_sink_scores(tiny_llama, [f"{word(1)} {word(2)} {word(3)}", word(4)])
    assert r.meta["pos0_is_bos"] is True
    assert r.meta["n_tokens"] == 4 + 2


def test_missing_bos_raises_unless_allowed(tiny_llama):
    tokens = torch.tensor([[10, 11, 12, 13]])
    with pytest.raises(ValueError, match="do not start with BOS"):
        tl_sinks.scan(tiny_llama, tokens, progress=False)
    with pytest.raises(ValueError, match="do not start with BOS"):
        tl_sinks.compute_sink_scores(tiny_llama, [word(1)], prepend_bos=False)
    r = tl_sinks.compute_sink_scores(tiny_llama, tokens, require_bos=False)
    assert r.meta["pos0_is_bos"] is False and r.meta["pos0_is_bos_fraction"] == 0.0


def test_double_bos_raises(tiny_llama):
    with pytest.raises(ValueError, match="two BOS"):
        tl_sinks.compute_sink_scores(tiny_llama, torch.tensor([[BOS, BOS, 10, 11]]))


def test_unmasked_padding_raises(tiny_llama):
    tokens = torch.tensor([[BOS, 10, 11, 12], [BOS, 13, PAD, PAD]])
    with pytest.raises(ValueError, match="look padded: row 1 ends with 2 pad"):
        tl_sinks.scan(tiny_llama, tokens, progress=False)
    left = torch.tensor([[BOS, 10, 11, 12], [PAD, PAD, BOS, 13]])
    with pytest.raises(ValueError, match="row 1 starts with 2 pad"):
        tl_sinks.compute_sink_scores(tiny_llama, left)


def test_padded_tensor_with_mask_equals_unpadded_prompts(tiny_llama):
    prompts = random_prompts([9, 4, 6], seed=2)
    ragged = tl_sinks.scan(tiny_llama, prompts, progress=False, batch_size=3)
    # Left-padded tensor + mask, as a HF tokenizer with padding_side="left" would give.
    P = 9
    tokens = torch.full((3, P), PAD)
    mask = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    left = tl_sinks.scan(tiny_llama, tokens, attention_mask=mask, progress=False, batch_size=3)
    torch.testing.assert_close(left.sinks.values, ragged.sinks.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(left.aggregation.values, ragged.aggregation.values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(left.super_neurons.max_abs, ragged.super_neurons.max_abs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(left.disparity.values, ragged.disparity.values, rtol=1e-5, atol=1e-6)


def test_padded_positions_never_count(tiny_llama):
    """Changing the tokens under padding changes nothing."""
    tokens = torch.tensor(random_prompts([8, 8], seed=4))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    a = tl_sinks.scan(tiny_llama, tokens, attention_mask=mask, progress=False)
    tokens2 = tokens.clone()
    tokens2[1, 5:] = torch.tensor([40, 41, 42])
    b = tl_sinks.scan(tiny_llama, tokens2, attention_mask=mask, progress=False)
    for name in ("sinks", "aggregation", "super_neurons", "disparity"):
        torch.testing.assert_close(getattr(a, name).values, getattr(b, name).values, rtol=0, atol=0)
    assert int(a.sinks.n_prompts[6]) == 1


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.tensor([[1, 1, 0, 1]]), "holes"),
        (torch.tensor([[0, 0, 0, 0]]), "all zeros"),
        (torch.tensor([[1, 2, 1, 1]]), "only 0 and 1"),
        (torch.tensor([[1, 1, 1]]), "shape"),
    ],
)
def test_bad_attention_masks_raise(tiny_llama, mask, match):
    with pytest.raises(ValueError, match=match):
        tl_sinks.compute_sink_scores(tiny_llama, torch.tensor([[BOS, 10, 11, 12]]), attention_mask=mask)


def test_empty_prompts_raise(tiny_llama):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tl_sinks.scan(tiny_llama, [word(1), ""], progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        tl_sinks.scan(tiny_llama, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        tl_sinks.scan(tiny_llama, torch.zeros(1, 0, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        tl_sinks.scan(tiny_llama, [[]], progress=False)


def test_too_long_prompt_raises(tiny_llama):
    n_ctx = tiny_llama.cfg.n_ctx
    with pytest.raises(ValueError, match=f"longer than the model's context n_ctx={n_ctx}"):
        tl_sinks.scan(tiny_llama, random_prompts([n_ctx + 1]), progress=False)
    text = " ".join(word(i % 50) for i in range(n_ctx + 5))
    with pytest.raises(ValueError, match="never truncates"):
        tl_sinks.scan(tiny_llama, [text], progress=False)


def test_out_of_vocab_ids_raise(tiny_llama):
    with pytest.raises(ValueError, match="outside"):
        tl_sinks.scan(tiny_llama, [[BOS, 10, 10_000]], progress=False)


def test_unknown_stage_and_bad_settings_raise(tiny_llama):
    with pytest.raises(ValueError, match="unknown stage"):
        tl_sinks.scan(tiny_llama, [[BOS, 10]], stages=["sink"], progress=False)
    with pytest.raises(ValueError, match="eps"):
        tl_sinks.compute_sink_scores(tiny_llama, [[BOS, 10]], eps=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        tl_sinks.scan(tiny_llama, [[BOS, 10]], batch_size=0, progress=False)


def test_nan_activations_raise_and_hooks_are_removed(tiny_llama_dir):
    model = tl_sinks.load_model(tiny_llama_dir, device="cpu")
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 0] = float("nan")  # poisons the residual from layer 1 on
    before = _n_hook_fns(model)
    with pytest.raises(tl_sinks.NonFiniteActivationError, match="NaN or inf activations at blocks.1"):
        tl_sinks.scan(model, random_prompts([6, 6]), progress=False)
    assert _n_hook_fns(model) == before
    # The model still runs cleanly with no tl_sinks hooks left behind.
    out = model(torch.tensor([[BOS, 10, 11]]))
    assert out.shape[-1] == model.cfg.d_vocab


def test_exception_inside_a_batch_removes_hooks(tiny_llama):
    before = _n_hook_fns(tiny_llama)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llama.hooks(fwd_hooks=[("blocks.1.hook_resid_post", boom)]):
            tl_sinks.scan(tiny_llama, random_prompts([5, 5, 5]), batch_size=1, progress=False)
    assert _n_hook_fns(tiny_llama) == before


def test_training_mode_raises(tiny_llama_dir):
    model = tl_sinks.load_model(tiny_llama_dir, device="cpu").train()
    with pytest.raises(ValueError, match="training mode"):
        tl_sinks.scan(model, random_prompts([4]), progress=False)


def test_not_a_model_raises():
    # Without runtime type checking tl_sinks' own check answers; with it (the test suite runs
    # with jaxtyping + beartype) the ModelLike annotation rejects the object first.
    with pytest.raises((tl_sinks.UnsupportedModelError, TypeError), match="not a TransformerLens model|ModelLike"):
        tl_sinks.scan(torch.nn.Linear(2, 2), [[1, 2]], progress=False)


@pytest.fixture(scope="module")
def attn_only_model():
    cfg = TransformerBridgeConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=32, d_vocab=50, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="standard", attn_only=True, seed=0,
    )
    return TransformerBridge.boot_native(cfg).eval()


def test_attention_only_model_has_no_super_neurons(attn_only_model):
    tokens = torch.randint(1, 50, (2, 6))
    with pytest.raises(tl_sinks.UnsupportedModelError, match="no MLP layers"):
        tl_sinks.find_super_neurons(attn_only_model, tokens, require_bos=False)
    with pytest.raises(tl_sinks.UnsupportedModelError, match="no MLP layers"):
        tl_sinks.scan(attn_only_model, tokens, stages=["super_neurons"], require_bos=False, progress=False)
    # The default scan skips the stage and says why.
    r = tl_sinks.scan(attn_only_model, tokens, require_bos=False, progress=False)
    assert r.super_neurons is None and "no MLP" in r.skipped["super_neurons"]
    assert r.sinks is not None and r.disparity is not None
    assert "skipped" in r.report()


def test_model_without_tokenizer_rejects_text(attn_only_model):
    with pytest.raises(ValueError, match="no tokenizer"):
        tl_sinks.scan(attn_only_model, ["hello"], require_bos=False, progress=False)
    with pytest.raises(ValueError, match="defines no BOS"):
        tl_sinks.scan(attn_only_model, torch.randint(1, 50, (1, 4)), progress=False)


def test_nan_in_one_prompt_names_the_batch(tiny_llama_dir):
    """NaN that only some tokens produce is caught by the per-batch check, not the probe."""
    model = tl_sinks.load_model(tiny_llama_dir, device="cpu")
    with torch.no_grad():
        model.original_model.model.embed_tokens.weight[40] = float("nan")
    ok = random_prompts([5, 5], seed=1, low=10, high=30)
    tl_sinks.scan(model, ok, progress=False)  # clean prompts pass
    bad = ok + [[BOS, 12, 40, 13]]
    before = _n_hook_fns(model)
    with pytest.raises(tl_sinks.NonFiniteActivationError, match=r"batch of prompts 2\.\.2"):
        tl_sinks.scan(model, bad, batch_size=2, progress=False)
    assert _n_hook_fns(model) == before


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([[BOS, 5.7, 6.0]], r"^prompts: prompt 0 holds torch.float32 values; token ids must be integers"),
        ([[BOS, 5, 6], [BOS, 7.0, 8.0]], r"^prompts: prompt 1 holds torch.float32"),
        ([[True, False, True]], r"^prompts: prompt 0 holds torch.bool"),
        (torch.tensor([[True, False, True]]), r"^prompts: the token tensor holds torch.bool"),
        (torch.tensor([[1.0, 5.0, 6.0]]), r"^prompts: the token tensor holds torch.float32"),
        (torch.tensor([[1, 5, 6]], dtype=torch.float16), r"^prompts: the token tensor holds torch.float16"),
        ([BOS, 5, 6], r"^prompts: prompt 0 is a single number \(1\)"),
        ([[[BOS, 5], [6, 7]]], r"^prompts: prompt 0 has shape \(2, 2\); each prompt must be a flat sequence"),
        ([[BOS, "w1"]], r"^prompts: prompt 0 is not a sequence of integer token ids"),
    ],
)
def test_non_integer_token_ids_raise_instead_of_being_coerced(tiny_llama, prompts, match):
    """Floats were truncated to ints and bools read as ids 0/1; a flat list became one-token prompts."""
    with pytest.raises(ValueError, match=match) as e:
        tl_sinks.scan(tiny_llama, prompts, stages=["sinks"], require_bos=False, progress=False)
    assert "\n" not in str(e.value)


def test_numpy_token_ids_are_checked_too(tiny_llama):
    import numpy as np

    ok = tl_sinks.compute_sink_scores(tiny_llama, np.array([[BOS, 5, 6]]))
    assert ok.meta["n_tokens"] == 3
    with pytest.raises(ValueError, match="prompt 0 holds torch.float64"):
        tl_sinks.compute_sink_scores(tiny_llama, np.array([[BOS, 5.5, 6.0]]))
