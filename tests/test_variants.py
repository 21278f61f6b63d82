"""Attention variants load back through load_model with the right behaviour and working hooks:
the TransformerLens bridge must compute exactly what the Hugging Face training model computes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

import tl_sinks
from tests.conftest import VOCAB, random_prompts
from tests.helpers import build_tokenizer, save_hf
from tl_sinks.train.modeling import VARIANTS, HeadNormLinear, build_variant, init_headnorm_from_first_token


def _cfg() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module", params=[v for v in VARIANTS if v != "softmax"])
def variant_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build_variant(_cfg(), request.param)
    with torch.no_grad():  # make the variant's own parameters non-trivial
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
    if request.param == "headnorm":
        init_headnorm_from_first_token(model)
    path = save_hf(model, build_tokenizer(VOCAB), tmp_path_factory.mktemp(request.param))
    return request.param, path, model.eval()


def test_variant_is_recorded_and_rebuilt(variant_dir):
    variant, path, _ = variant_dir
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tl_sinks_attention"] == variant and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "_attn_implementation" not in cfg


def test_bridge_computes_what_the_training_model_computes(variant_dir):
    variant, path, hf = variant_dir
    bridge = tl_sinks.load_model(path, device="cpu")
    tokens = torch.tensor(random_prompts([9, 9], seed=2))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(bridge(tokens), expected, rtol=1e-4, atol=1e-5)
    # And it differs from a plain Llama with the same shared weights: the variant is really on.
    plain = build_variant(_cfg(), "softmax").eval()
    plain.load_state_dict({k: v for k, v in hf.state_dict().items() if "sinks" not in k and "head_norm" not in k
                           and not (variant == "gated" and "q_proj" in k)}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain(tokens).logits, expected, atol=1e-4)


def test_hooks_work_on_every_variant(variant_dir):
    variant, path, _ = variant_dir
    bridge = tl_sinks.load_model(path, device="cpu")
    r = tl_sinks.scan(bridge, random_prompts([10] * 3, seed=3), progress=False)
    assert r.sinks.values.shape[:2] == (2, 4)
    if variant in ("sink_logit", "softmax1"):
        # The sink column takes probability mass: rows of hook_pattern sum to less than one.
        _, cache = bridge.run_with_cache(torch.tensor(random_prompts([6])), names_filter=["blocks.0.attn.hook_pattern"])
        rows = cache["blocks.0.attn.hook_pattern"].sum(-1)
        assert bool((rows < 1 - 1e-4).all())


def test_headnorm_gain_starts_at_the_first_token_spread():
    torch.manual_seed(0)
    model = build_variant(_cfg(), "headnorm").eval()
    init_headnorm_from_first_token(model, seed=5)
    seen = {}
    h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0]))
    try:
        # init_headnorm_from_first_token ran this input before changing any gain; layer 0's
        # input does not depend on the gains, so its first-token output is reproduced.
        model(torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5)))
    finally:
        h.remove()
    o = model.model.layers[0].self_attn.o_proj
    assert isinstance(o, HeadNormLinear)
    first = seen["z"][0, 0].view(o.n_heads, o.head_dim).std(-1, unbiased=False)
    torch.testing.assert_close(o.head_norm_weight[:, 0], first)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="unknown attention variant"):
        build_variant(_cfg(), "linear")
