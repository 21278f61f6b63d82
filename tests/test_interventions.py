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
        with intervene(tiny_llama, AmplifyDeviation(pos=1, lam=2.0, mu=[[[0.0]]])):
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


def test_nested_intervene_equals_flat(tiny_gptj):
    tokens = torch.tensor(random_prompts([8, 8], seed=11))
    a, b = SelfOnlyMask(pos=3), AmplifyDeviation(pos=5, lam=4.0)
    with torch.no_grad():
        with intervene(tiny_gptj, a, b):
            flat = tiny_gptj(tokens)
        with intervene(tiny_gptj, a), intervene(tiny_gptj, b):
            nested = tiny_gptj(tokens)
        plain = tiny_gptj(tokens)
    torch.testing.assert_close(nested, flat, rtol=0, atol=0)
    assert not torch.allclose(plain, flat)


# --------------------------------------------------------------------------- field validation
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: AmplifyDeviation(pos=3, lam=NAN), "lam"),
        (lambda: AmplifyDeviation(pos=3, lam=INF), "lam"),
        (lambda: AmplifyDeviation(pos=3, lam=-INF), "lam"),
        (lambda: AmplifyDeviation(pos=3, lam=2.0, mu=[[[0.0, NAN]]]), "mu"),
        (lambda: ScaleOutput(pos=3, lam=NAN), "lam"),
        (lambda: ScaleOutput(pos=3, lam=INF), "lam"),
        (lambda: HeadRMSNorm(eps=-1e-6), "eps"),
        (lambda: HeadRMSNorm(eps=NAN), "eps"),
        (lambda: HeadRMSNorm(eps=INF), "eps"),
        (lambda: HeadRMSNorm(gain=[[1.0, INF]]), "gain"),
        (lambda: SelfOnlyMask(pos=3, strength=NAN), "strength"),
        (lambda: AblateNeurons(neurons=((0, 1),), mode="value", value=NAN), "value"),
        (lambda: AblateResidDims(dims=(1,), mode="value", value=INF), "value"),
        (lambda: AblateResidDims(dims=(1,), strength=NAN), "strength"),
    ],
)
def test_non_finite_numbers_raise_at_construction(build, field):
    """NaN or inf strengths gave NaN logits under intervene; negative eps a NaN RMS."""
    with pytest.raises(ValueError, match=rf"^\w+: {field}=.* must be") as e:
        build()
    assert "\n" not in str(e.value)


def test_nan_lam_used_to_give_nan_logits(tiny_llama):
    tokens = torch.tensor(random_prompts([6]))
    with pytest.raises(ValueError, match="lam=nan must be finite"):
        with intervene(tiny_llama, AmplifyDeviation(pos=2, lam=NAN)):
            tiny_llama(tokens)


SOM = {"kind": "self_only_mask", "pos": 3}
AMP = {"kind": "amplify_deviation", "pos": 3, "lam": 2.0}
NEU = {"kind": "ablate_neurons", "neurons": [[0, 5]]}
DIMS = {"kind": "ablate_resid_dims", "dims": [1]}
RMS = {"kind": "head_rmsnorm"}
BAD_DICTS = [
    ([("kind", "self_only_mask"), ("pos", 3)], "from_dict expects a dict"),
    ("self_only_mask", "from_dict expects a dict"),
    ({"pos": 3}, "unknown intervention kind None"),
    ({"kind": "nope", "pos": 3}, "unknown intervention kind 'nope'"),
    ({"kind": 5}, "unknown intervention kind 5"),
    ({"kind": "self_only_mask"}, r"self_only_mask is missing field\(s\) \['pos'\]"),
    ({**SOM, "posn": 4}, r"self_only_mask has no field\(s\) 'posn'"),
    ({**SOM, 7: 4}, r"self_only_mask has no field\(s\) 7"),
    ({**SOM, "pos": [3, 4]}, r"pos=\[3, 4\] must be an int"),
    ({**SOM, "pos": 1.5}, "pos=1.5 must be an int, got float"),
    ({**SOM, "pos": 3.0}, "pos=3.0 must be an int, got float"),
    ({**SOM, "pos": -2}, "pos=-2 must be >= 0"),
    ({**SOM, "pos": True}, "pos=True must be an int, got bool"),
    ({**SOM, "pos": "3"}, "pos='3' must be an int, got str"),
    ({**SOM, "layers": 5}, "layers=5 must be a non-empty list of ints"),
    ({**SOM, "layers": [0.5]}, r"layers=\[0.5\] must be an int"),
    ({**SOM, "layers": [0, "1"]}, "layers=.* must be an int, got str"),
    ({**SOM, "layers": [-1]}, "layers=.* must be >= 0"),
    ({**SOM, "layers": [0, 0]}, "layers=.* must not repeat"),
    ({**SOM, "layers": []}, r"layers=\[\] must be a non-empty list"),
    ({**SOM, "layers": {"0": 1}}, "layers=.* must be a non-empty list"),
    ({**SOM, "strength": "1"}, "strength='1' must be a number"),
    ({**SOM, "strength": 2}, r"strength=2 must be in \[0, 1\]"),
    ({**SOM, "strength": None}, "strength=None must be a number"),
    ({**SOM, "route": "both"}, "route='both' must be 'auto', 'z' or 'pattern'"),
    ({**AMP, "lam": None}, "lam=None must be a number"),
    ({**AMP, "lam": "inf"}, "lam='inf' must be a number"),
    ({**AMP, "lam": INF}, "lam=inf must be finite"),
    ({**AMP, "mu": "mean"}, "mu='mean' must be 'positions'"),
    ({**AMP, "mu": [[1.0, 2.0]]}, r"mu=.* must be 'positions' or a \[layer\]\[head_index\]\[d_head\] list"),
    ({**AMP, "mu": [[[1.0], [1.0, 2.0]]]}, "mu=.* must be a rectangular"),
    ({**AMP, "mu": [[["a"]]]}, "mu=.* must be 'positions' or a"),
    ({**NEU, "neurons": [1, 2]}, "neurons=.* must be a non-empty list of \\(layer, neuron\\) pairs"),
    ({**NEU, "neurons": [[0, 5.5]]}, "neurons=.* must be an int, got float"),
    ({**NEU, "neurons": [[0, -1]]}, "neurons=.* must be >= 0"),
    ({**NEU, "neurons": [[0, 1, 2]]}, "neurons=.* pairs"),
    ({**NEU, "neurons": []}, "neurons=.* pairs"),
    ({**NEU, "neurons": "0,5"}, "neurons=.* pairs"),
    ({**NEU, "pos": [-1]}, "pos=.* must be >= 0"),
    ({**NEU, "pos": "0"}, "pos='0' must be an int >= 0, a list of them, or None"),
    ({**NEU, "pos": 0.0}, "pos=0.0 must be an int >= 0, a list of them, or None"),
    ({**NEU, "mode": "median"}, "mode='median' must be 'zero', 'mean' or 'value'"),
    ({**NEU, "value": NAN}, "value=nan must be finite"),
    ({**DIMS, "dims": []}, "dims=.* must be a non-empty list"),
    ({**DIMS, "dims": [1.0]}, "dims=.* must be an int"),
    ({**DIMS, "dims": 3}, "dims=3 must be a non-empty list"),
    ({**DIMS, "layers": [1, 2.5]}, "layers=.* must be an int"),
    ({**RMS, "eps": -1}, "eps=-1 must be >= 0.0"),
    ({**RMS, "eps": NAN}, "eps=nan must be finite"),
    ({**RMS, "gain": "unit"}, "gain='unit' must be 'batch_rms' or 'ones'"),
    ({**RMS, "gain": [[1.0, INF]]}, "gain=.* must be 'batch_rms' or 'ones' or a \\[layer\\]\\[head_index\\] list"),
    ({**RMS, "gain": [1.0, 2.0]}, "gain=.* list of finite numbers"),
]


@pytest.mark.parametrize(("d", "match"), BAD_DICTS, ids=[str(i) for i in range(len(BAD_DICTS))])
def test_from_dict_rejects_garbage_with_one_line_errors(d, match):
    with pytest.raises(ValueError, match=match) as e:
        from_dict(d)
    assert "\n" not in str(e.value)
    if "missing" not in match and isinstance(d, dict) and d.get("kind") in ("self_only_mask", "amplify_deviation", "ablate_neurons", "ablate_resid_dims", "head_rmsnorm"):
        assert any(f"{k}=" in str(e.value) or f"{k!r}" in str(e.value) for k in d if k != "kind"), e.value


# --------------------------------------------------------------------------- round trips (hypothesis)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_idx = st.integers(0, 40)
_layers = st.none() | st.lists(_idx, min_size=1, max_size=3, unique=True).map(tuple)
_pos = st.none() | _idx | st.lists(_idx, min_size=1, max_size=3).map(tuple)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_unit = st.floats(0.0, 1.0)
_mode = st.sampled_from(["zero", "mean", "value"])


def _grid(depth: int):
    """Rectangular nested lists of finite floats, ``depth`` levels deep."""
    shape = st.lists(st.integers(1, 2), min_size=depth, max_size=depth)

    def build(dims):
        s = _finite
        for n in reversed(dims):
            s = st.lists(s, min_size=n, max_size=n)
        return s

    return shape.flatmap(build)


def _spec(cls, **fields):
    # Build the spec in the test body, not in the strategy: runtime type checks (beartype) draw
    # random numbers, which Hypothesis forbids inside strategies.
    return st.tuples(st.just(cls), st.fixed_dictionaries(fields))


SPECS = st.one_of(
    _spec(SelfOnlyMask, pos=_idx, layers=_layers, strength=_unit, route=st.sampled_from(["auto", "z", "pattern"])),
    _spec(AmplifyDeviation, pos=_idx, lam=_finite, layers=_layers, mu=st.just("positions") | _grid(3)),
    _spec(ScaleOutput, pos=_idx, lam=_finite, layers=_layers),
    _spec(
        AblateNeurons, neurons=st.lists(st.tuples(_idx, _idx), min_size=1, max_size=3).map(tuple), pos=_pos,
        mode=_mode, value=_finite, strength=_unit,
    ),
    _spec(
        AblateResidDims, dims=st.lists(_idx, min_size=1, max_size=3).map(tuple), layers=_layers, pos=_pos,
        mode=_mode, value=_finite, strength=_unit,
    ),
    _spec(HeadRMSNorm, layers=_layers, gain=st.sampled_from(["batch_rms", "ones"]) | _grid(2), eps=st.floats(0.0, 1.0)),
)
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=3),
    st.lists(st.one_of(st.integers(-2, 2), st.floats(), st.text(max_size=1), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built=SPECS)
def test_every_spec_round_trips_through_json(built):
    import json

    spec = built[0](**built[1])
    d = json.loads(json.dumps(spec.to_dict()))
    assert from_dict(d) == spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built=SPECS, data=st.data(), junk=GARBAGE)
def test_from_dict_with_one_field_garbled_rebuilds_or_names_the_field(built, data, junk):
    """Either the garbled value is valid for the field (and round-trips) or a one-line ValueError names it."""
    spec = built[0](**built[1])
    d = spec.to_dict()
    field = data.draw(st.sampled_from([k for k in d if k != "kind"]))
    d[field] = junk
    try:
        rebuilt = from_dict(d)
    except ValueError as e:
        assert str(e).startswith(f"{type(spec).__name__}: {field}="), e
        assert "\n" not in str(e)
    else:
        assert from_dict(rebuilt.to_dict()) == rebuilt
