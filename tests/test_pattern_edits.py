"""Pattern statistics under SelfOnlyMask are what the model computed, on every bridge.

TransformerLens 4.3 bridges that delegate attention to the HF module (GPT-J, OPT, BERT,
RoBERTa) fire ``hook_pattern`` after the fact and discard edits, so the mask is made on
``hook_z`` there. The reference is plain transformers with a real 4D self-only attention mask
(row ``p`` sees only key ``p``) and ``output_attentions=True``; Llama and GPT-2, whose bridges
apply pattern edits, are the controls.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_sinks
from tests.conftest import random_prompts
from tl_sinks import interventions
from tl_sinks.interventions import (
    AmplifyDeviation,
    PatternReadout,
    SelfOnlyMask,
    intervene,
    pattern_readout,
)

T, P = 7, 3
# family (fixture tiny_<family>) -> (causal, how the bridge takes pattern edits)
FAMILIES = {
    "gptj": (True, "mirrored"),
    "opt": (True, "mirrored"),
    "roberta": (False, "mirrored"),
    "bert": (False, "mirrored"),
    "llama": (True, "applied"),
    "gpt2": (True, "applied"),
}


def _self_only_allowed(causal: bool) -> torch.Tensor:
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed[P] = False
    allowed[P, P] = True
    return allowed


def _hf_masked(path, family: str, causal: bool, tokens: torch.Tensor):
    """HF forward with a 4D additive self-only mask (eager attention, fp32)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    hf = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    allowed = _self_only_allowed(causal)
    mask = torch.zeros(tokens.shape[0], 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    kw = {}
    if family == "opt":  # OPT derives positions from a 2D mask; give them, as a 2D mask would
        kw["position_ids"] = torch.arange(T).expand(tokens.shape[0], T)
    with torch.no_grad():
        return hf(tokens, attention_mask=mask, output_attentions=True, **kw)


def _alpha(attentions: tuple[torch.Tensor, ...], causal: bool) -> torch.Tensor:
    """Mean attention each key receives from the queries that may see it, ``[layer, head, key]``."""
    a = torch.stack(attentions, 1)  # [batch, layer, head, q, k]
    counts = (T - torch.arange(T)).float() if causal else torch.full((T,), float(T))
    return (a.sum(-2) / counts).mean(0)


@pytest.fixture(params=list(FAMILIES))
def family(request):
    name = request.param
    return name, request.getfixturevalue(f"tiny_{name}"), request.getfixturevalue(f"tiny_{name}_dir")


def test_scan_alpha_under_self_only_mask_matches_hf_4d_mask(family):
    name, model, path = family
    causal, mode = FAMILIES[name]
    prompts = random_prompts([T] * 3, seed=21)
    res = tl_sinks.scan(model, prompts, stages=["sinks"], interventions=[SelfOnlyMask(pos=P)], progress=False)
    ref = _hf_masked(path, name, causal, torch.tensor(prompts))
    assert float(torch.stack(ref.attentions)[..., P, P].min()) == 1.0  # the reference really is masked
    torch.testing.assert_close(res.sinks.values, _alpha(ref.attentions, causal), rtol=0, atol=1e-5)
    edits = res.meta["pattern_edits"]
    assert edits["mode"] == mode and edits["self_check"] == "passed"


def test_self_only_mask_logits_match_hf_4d_mask(family):
    name, model, path = family
    causal, _ = FAMILIES[name]
    tokens = torch.tensor(random_prompts([T] * 2, seed=22))
    ref = _hf_masked(path, name, causal, tokens).logits
    with torch.no_grad(), intervene(model, SelfOnlyMask(pos=P)):
        out = model(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cached_pattern_is_the_one_used_and_autograd_runs_without_warnings(tiny_gptj):
    """Under autograd the rewrite is a copy; TransformerLens' "edit is discarded" warning is expected and muted."""
    tokens = torch.tensor(random_prompts([T], seed=23))
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with intervene(tiny_gptj, SelfOnlyMask(pos=P)):
            logits, cache = tiny_gptj.run_with_cache(tokens, names_filter=names)
            (grad,) = torch.autograd.grad(logits[0, -1].sum(), tiny_gptj.blocks[0].attn.v.weight)
    assert torch.isfinite(grad).all()
    onehot = torch.zeros(T)
    onehot[P] = 1.0
    for name in names:
        torch.testing.assert_close(cache[name][0, :, P], onehot.expand(4, T), rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gptj"])
def test_partial_strength_blends_the_output_once(request, model_name):
    """z[p] = (1 - s) z[p] + s v[p] at strength s, on both routes (the pattern route once applied it twice)."""
    model = request.getfixturevalue(model_name)
    tokens = torch.tensor(random_prompts([T], seed=24))
    names = ["blocks.0.attn.hook_z", "blocks.0.attn.hook_v"]
    _, plain = model.run_with_cache(tokens, names_filter=names)
    seen = {}

    def grab(t, hook):
        seen["z"] = t.detach().clone()

    with intervene(model, SelfOnlyMask(pos=P, layers=(0,), strength=0.5)), model.hooks(fwd_hooks=[(names[0], grab)]):
        model(tokens)
    z, v = plain[names[0]], plain[names[1]]
    v = v.repeat_interleave(z.shape[2] // v.shape[2], dim=2)
    torch.testing.assert_close(seen["z"][:, P], 0.5 * z[:, P] + 0.5 * v[:, P], rtol=1e-5, atol=1e-6)


def test_failed_self_check_refuses_pattern_statistics(tiny_gptj, monkeypatch):
    failed = PatternReadout(mode="mirrored", verified=False, max_err=0.3)
    monkeypatch.setitem(interventions._READOUT, tiny_gptj, (interventions._probe_cache_key(tiny_gptj), failed))
    prompts = random_prompts([T] * 2, seed=25)
    with pytest.raises(ValueError, match=r"^GPTJForCausalLM: attention patterns cannot be reported under SelfOnlyMask\(pos=3") as e:
        tl_sinks.scan(tiny_gptj, prompts, stages=["sinks"], interventions=[SelfOnlyMask(pos=P)], progress=False)
    assert "\n" not in str(e.value)
    # Stages that do not read hook_pattern still run (the z route is honoured everywhere) ...
    r = tl_sinks.scan(tiny_gptj, prompts, stages=["aggregation"], interventions=[SelfOnlyMask(pos=P)], progress=False)
    assert r.meta["pattern_edits"]["self_check"] == "failed"
    # ... and so does pattern reading under a neutral mask, which edits nothing.
    tl_sinks.scan(tiny_gptj, prompts, stages=["sinks"], interventions=[SelfOnlyMask(pos=P, strength=0.0)], progress=False)


def test_z_only_route_refuses_pattern_statistics(tiny_llama):
    prompts = random_prompts([T] * 2, seed=26)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: .*route='z' edits hook_z only"):
        tl_sinks.scan(tiny_llama, prompts, stages=["sinks"], interventions=[SelfOnlyMask(pos=P, route="z")], progress=False)


def test_no_pattern_edit_no_readout_in_meta(tiny_gptj):
    r = tl_sinks.scan(tiny_gptj, random_prompts([T], seed=27), stages=["sinks"], progress=False,
                      interventions=[AmplifyDeviation(pos=P, lam=3.0)])
    assert "pattern_edits" not in r.meta


def test_readout_probe_ignores_outer_hooks(tiny_opt, monkeypatch):
    """First use inside another intervene: the outer edits must not leak into the self-check."""
    monkeypatch.delitem(interventions._READOUT, tiny_opt, raising=False)
    monkeypatch.delitem(interventions._PATTERN_EDITABLE, tiny_opt, raising=False)
    tokens = torch.tensor(random_prompts([T], seed=28))
    with torch.no_grad(), intervene(tiny_opt, AmplifyDeviation(pos=3, lam=5.0)):
        with intervene(tiny_opt, SelfOnlyMask(pos=P)):
            _, cache = tiny_opt.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_pattern"])
    readout = pattern_readout(tiny_opt)
    assert readout.mode == "mirrored" and readout.verified, readout
    assert float(cache["blocks.1.attn.hook_pattern"][0, :, P, P].min()) == 1.0
