"""Interventions: exact no-ops, independent references, both attention routes, serialisation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tl_sinks
from tests.conftest import PLANT, random_prompts
from tests.helpers import llama_reference
from tl_sinks.hooks import _n_hook_fns
from tl_sinks.interventions import (
    AblateNeurons,
    AblateResidDims,
    AmplifyDeviation,
    HeadRMSNorm,
    ScaleOutput,
    SelfOnlyMask,
    from_dict,
    intervene,
    pattern_edits_apply,
)

ALL_NOOPS = [
    AmplifyDeviation(pos=3, lam=1.0),
    ScaleOutput(pos=3, lam=1.0),
    SelfOnlyMask(pos=3, strength=0.0),
    AblateNeurons(neurons=((0, 5), (1, 7)), pos=None, mode="mean", strength=0.0),
    AblateResidDims(dims=(1, 2), mode="zero", strength=0.0),
]


@pytest.mark.parametrize("spec", ALL_NOOPS, ids=lambda s: s.kind)
def test_neutral_strength_is_an_exact_noop(tiny_llama, spec):
    tokens = torch.tensor(random_prompts([8, 8], seed=1))
    base = tiny_llama(tokens)
    with intervene(tiny_llama, spec):
        out = tiny_llama(tokens)
    torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_self_only_mask_matches_reference_forward(tiny_llama, tiny_llama_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    sd = load_file(str(tiny_llama_dir / "model.safetensors"))
    prompt = random_prompts([10], seed=3)[0]
    ref = llama_reference(sd, cfg, prompt, self_only=4)["logits"][0]
    plain = llama_reference(sd, cfg, prompt)["logits"][0]
    tokens = torch.tensor([prompt])
    for route in ("auto", "z", "pattern"):
        with intervene(tiny_llama, SelfOnlyMask(pos=4, route=route)):
            out = tiny_llama(tokens)[0]
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    # Positions before 4 cannot see the edit under a causal mask; later ones do.
    assert torch.allclose(ref[:4], plain[:4]) and not torch.allclose(ref[5:], plain[5:])


def test_self_only_mask_makes_p_a_first_token_under_rotary_positions(tiny_llama):
    # Rotary attention sees only relative positions, and a token that attends only to itself in
    # every layer sees nothing else: its residual stream equals the same token's alone at
    # position 0. So on a rotary model the mask turns p into a first token *without BOS*; it can
    # create a sink at p only where the model sinks on such tokens (the default model does not).
    prompt = random_prompts([10], seed=4)[0]
    p = 6
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(tiny_llama.cfg.n_layers)]
    with intervene(tiny_llama, SelfOnlyMask(pos=p)):
        _, masked = tiny_llama.run_with_cache(torch.tensor([prompt]), names_filter=names)
    _, alone = tiny_llama.run_with_cache(torch.tensor([prompt[p : p + 1]]), names_filter=names)
    _, plain = tiny_llama.run_with_cache(torch.tensor([prompt]), names_filter=names)
    for name in names:
        torch.testing.assert_close(masked[name][0, p], alone[name][0, 0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain[name][0, p], alone[name][0, 0], atol=1e-3)


def test_self_only_mask_on_bert_uses_the_z_route(minilm):
    """HF BERT discards pattern edits; the z route must still make token p read only v[p]."""
    assert pattern_edits_apply(minilm) is False
    tokens = minilm.to_tokens("the quick brown fox jumps over the lazy dog")
    with pytest.raises(ValueError, match="discards hook_pattern edits"):
        with intervene(minilm, SelfOnlyMask(pos=3, route="pattern")):
            pass
    seen = {}

    def grab(name):
        def hook(t, hook):
            seen[name] = t.detach().clone()

        return hook

    with intervene(minilm, SelfOnlyMask(pos=3, layers=(2,))):
        with minilm.hooks(fwd_hooks=[("blocks.2.attn.hook_v", grab("v")), ("blocks.2.attn.hook_z", grab("z"))]):
            minilm(tokens)
    torch.testing.assert_close(seen["z"][:, 3], seen["v"][:, 3], rtol=0, atol=0)


def test_pattern_edits_apply_is_measured(tiny_llama, tiny_gpt2):
    assert pattern_edits_apply(tiny_llama) is True
    assert pattern_edits_apply(tiny_gpt2) is True


def test_amplify_deviation_formula_at_layer_0(tiny_llama):
    tokens = torch.tensor(random_prompts([9, 9], seed=5))
    _, cache = tiny_llama.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_z"])
    z = cache["blocks.0.attn.hook_z"]
    seen = {}

    def grab(t, hook):
        seen["z"] = t.detach().clone()

    with intervene(tiny_llama, AmplifyDeviation(pos=4, lam=7.0, layers=(0,))):
        with tiny_llama.hooks(fwd_hooks=[("blocks.0.attn.hook_z", grab)]):
            tiny_llama(tokens)
    mu = z.mean(1)  # mean over positions, per prompt and head
    expected = z.clone()
    expected[:, 4] = mu + 7.0 * (z[:, 4] - mu)
    torch.testing.assert_close(seen["z"], expected, rtol=1e-5, atol=1e-6)
    # A fixed mu (e.g. a corpus mean) is used as given.
    fixed = torch.randn(tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads, tiny_llama.cfg.d_head)
    with intervene(tiny_llama, AmplifyDeviation(pos=4, lam=3.0, layers=(0,), mu=fixed.tolist())):
        with tiny_llama.hooks(fwd_hooks=[("blocks.0.attn.hook_z", grab)]):
            tiny_llama(tokens)
    torch.testing.assert_close(seen["z"][:, 4], fixed[0] + 3.0 * (z[:, 4] - fixed[0]), rtol=1e-5, atol=1e-5)


def test_scale_output_and_head_rmsnorm_formulas(tiny_llama):
    tokens = torch.tensor(random_prompts([7], seed=6))
    _, cache = tiny_llama.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_z"])
    z = cache["blocks.0.attn.hook_z"]
    seen = {}

    def grab(t, hook):
        seen["z"] = t.detach().clone()

    with intervene(tiny_llama, ScaleOutput(pos=2, lam=4.0, layers=(0,))):
        with tiny_llama.hooks(fwd_hooks=[("blocks.0.attn.hook_z", grab)]):
            tiny_llama(tokens)
    torch.testing.assert_close(seen["z"][:, 2], 4.0 * z[:, 2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen["z"][:, 3], z[:, 3], rtol=0, atol=0)
    with intervene(tiny_llama, HeadRMSNorm(layers=(0,), gain="ones")):
        with tiny_llama.hooks(fwd_hooks=[("blocks.0.attn.hook_z", grab)]):
            tiny_llama(tokens)
    torch.testing.assert_close(seen["z"], z / (z.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(), rtol=1e-5, atol=1e-6)
    with intervene(tiny_llama, HeadRMSNorm(layers=(0,), gain="ones", eps=0.0)):
        with tiny_llama.hooks(fwd_hooks=[("blocks.0.attn.hook_z", grab)]):
            tiny_llama(tokens)
    rms = seen["z"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-5, atol=1e-5)


def test_head_rmsnorm_removes_the_variance_discrepancy(tiny_llama):
    prompts = random_prompts([12] * 4, seed=7)
    r = tl_sinks.scan(tiny_llama, prompts, stages=["aggregation"], progress=False, interventions=[HeadRMSNorm(gain="ones", eps=0.0)])
    ratio = r.aggregation.first_rest_ratio(stat="rms").values
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-5, atol=1e-5)
    assert r.aggregation.meta["interventions"] == [HeadRMSNorm(gain="ones", eps=0.0).to_dict()]


def test_neuron_ablation_matches_a_bare_hook(planted_llama):
    tokens = torch.tensor(random_prompts([10, 10], seed=8, low=10))

    def bare(post, hook):
        post = post.clone()
        post[:, 0, PLANT["neuron"]] = 0.0
        return post

    with planted_llama.hooks(fwd_hooks=[(f"blocks.{PLANT['layer']}.mlp.hook_post", bare)]):
        expected = planted_llama(tokens)
    with intervene(planted_llama, AblateNeurons(neurons=((PLANT["layer"], PLANT["neuron"]),), pos=0)):
        out = planted_llama(tokens)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_mean_ablation_uses_the_neurons_typical_value(planted_llama):
    tokens = torch.tensor(random_prompts([10, 10], seed=9, low=10))
    name = f"blocks.{PLANT['layer']}.mlp.hook_post"
    _, cache = planted_llama.run_with_cache(tokens, names_filter=[name])
    post = cache[name][..., PLANT["neuron"]]
    seen = {}

    def grab(t, hook):
        seen["post"] = t.detach().clone()

    spec = AblateNeurons(neurons=((PLANT["layer"], PLANT["neuron"]),), pos=0, mode="mean")
    with intervene(planted_llama, spec), planted_llama.hooks(fwd_hooks=[(name, grab)]):
        planted_llama(tokens)
    after = seen["post"][..., PLANT["neuron"]]
    torch.testing.assert_close(after[:, 0], post[:, 1:].mean().expand(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[:, 1:], post[:, 1:], rtol=0, atol=0)


def test_ablating_the_massive_dim_with_a_spec(planted_llama):
    prompts = random_prompts([16] * 4, seed=10, low=10)
    spec = AblateResidDims(dims=(PLANT["massive_dim"],), pos=0)
    d = tl_sinks.compute_dimension_disparity(planted_llama, prompts)
    r = tl_sinks.scan(planted_llama, prompts, stages=["disparity"], progress=False, interventions=[spec])
    assert float(d.first_mean_abs[PLANT["layer"], PLANT["massive_dim"]]) > 100
    # The hook edits the residual after each block, so the scan (which reads the same hook
    # point after the edit) sees zero there.
    assert float(r.disparity.first_mean_abs[:, PLANT["massive_dim"]].abs().max()) == 0.0


@pytest.mark.parametrize(
    "spec",
    ALL_NOOPS + [HeadRMSNorm(layers=(1,), gain=[[1.0] * 4, [2.0] * 4]), SelfOnlyMask(pos=2, layers=(0, 1), route="z")],
    ids=lambda s: s.kind,
)
def test_specs_round_trip_through_dicts(spec):
    import json

    d = json.loads(json.dumps(spec.to_dict()))
    assert from_dict(d) == spec


def test_bad_specs_raise_clear_errors(tiny_llama):
    tokens = torch.tensor(random_prompts([6]))
    with pytest.raises(ValueError, match="position 9 is outside the input"):
        with intervene(tiny_llama, SelfOnlyMask(pos=9)):
            tiny_llama(tokens)
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] out of range"):
        with intervene(tiny_llama, ScaleOutput(pos=1, lam=2.0, layers=(5,))):
            pass
    with pytest.raises(ValueError, match="neuron 999 out of range"):
        with intervene(tiny_llama, AblateNeurons(neurons=((0, 999),))):
            pass
    # Checked at construction (by beartype too when runtime type checks are on).
    with pytest.raises((ValueError, TypeError), match="mode"):
        AblateNeurons(neurons=((0, 1),), mode="median")
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
        SelfOnlyMask(pos=1, strength=1.5)
    with pytest.raises(ValueError, match="pos=-1 must be >= 0"):
        ScaleOutput(pos=-1, lam=2.0)
    with pytest.raises(ValueError, match="mu has shape"):
        with intervene(tiny_llama, AmplifyDeviation(pos=1, lam=2.0, mu=[[0.0]])):
            pass
    with pytest.raises(ValueError, match="unknown intervention kind"):
        from_dict({"kind": "nope"})
    with pytest.raises(TypeError, match="not a tl_sinks intervention|Intervention"):  # beartype or ours
        with intervene(tiny_llama, "mask"):
            pass


def test_hooks_are_removed_after_an_error_inside_intervene(tiny_llama):
    before = _n_hook_fns(tiny_llama)
    with pytest.raises(RuntimeError, match="inside"):
        with intervene(tiny_llama, SelfOnlyMask(pos=2), AmplifyDeviation(pos=3, lam=5.0)):
            assert _n_hook_fns(tiny_llama) > before
            raise RuntimeError("inside")
    assert _n_hook_fns(tiny_llama) == before
