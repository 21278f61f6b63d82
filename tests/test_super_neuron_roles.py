"""Roles of the neurons the super-neuron finder reports: which are the chain's super neurons.

A neuron with a high position ratio is only a link of the chain when it fires at the first
token (its position ratio is measured at position 0) *and* its down-projection row is
channel-sparse (excess kurtosis and top-3 share above ``DEFAULT_MIN_KURTOSIS`` and
``DEFAULT_MIN_TOP3_SHARE``). ``trace_chain`` ablates only those.

* Planted: three neurons put into the weights of ``planted_llama_dir`` (conftest ``PLANT``), one
  per role, found without being told.
* The embedded default model and MiniLM: the chain set is re-measured, and every neuron's role
  is checked against the properties that define it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import tl_sinks
from tests.conftest import PLANT, VOCAB, random_prompts
from tests.helpers import N_SPECIAL, build_tokenizer, save_hf
from tl_sinks.super_neurons import (
    DEFAULT_MIN_KURTOSIS,
    DEFAULT_MIN_TOP3_SHARE,
    ROLE_COLUMNS,
    channel_concentration,
    excess_kurtosis,
    super_neuron_roles,
)
from tl_sinks.trace import trace_chain

# Planted next to PLANT's neuron (first token, one-hot down row: "chain"), in the same layer.
FIRST_DENSE = 20  # reads PLANT's BOS-only source dim, like PLANT's neuron, but writes a dense row
OTHER = 30  # reads a dim only token RARE has, writes a dense row: peaks wherever RARE sits
OTHER_SOURCE_DIM = 6
RARE = 9  # ordinary prompts use ids >= 10, so RARE appears only where it is placed
RARE_AT = {2: 4, 7: 11}  # prompt -> position of RARE


def _dense_row(d: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    """Equal magnitudes, random signs: excess kurtosis about -2, top-3 share 3/d."""
    g = torch.Generator().manual_seed(seed)
    return scale * (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()


def _save_variant(src, tmp_path_factory, name: str, edit) -> object:
    model = LlamaForCausalLM.from_pretrained(src)
    sd = model.state_dict()
    with torch.no_grad():
        edit(sd, f"model.layers.{PLANT['layer']}.mlp.")
    model.load_state_dict(sd)
    return save_hf(model, build_tokenizer(VOCAB), tmp_path_factory.mktemp(name))


def _read_only(sd, p: str, neuron: int, dim: int) -> None:
    for name in ("gate_proj", "up_proj"):
        w = sd[p + name + ".weight"]
        w[neuron] = 0.0
        w[neuron, dim] = 3.0


@pytest.fixture(scope="module")
def roles_llama(planted_llama_dir, tmp_path_factory):
    """PLANT's model plus a dense first-token neuron and a dense other-position neuron."""

    def edit(sd, p):
        d = sd["model.embed_tokens.weight"].shape[1]
        emb = sd["model.embed_tokens.weight"]
        emb[:, OTHER_SOURCE_DIM] = 0.0
        emb[RARE, OTHER_SOURCE_DIM] = 1.0
        _read_only(sd, p, FIRST_DENSE, PLANT["source_dim"])
        _read_only(sd, p, OTHER, OTHER_SOURCE_DIM)
        sd[p + "down_proj.weight"][:, FIRST_DENSE] = _dense_row(d, 1)
        sd[p + "down_proj.weight"][:, OTHER] = _dense_row(d, 2)

    return tl_sinks.load_model(_save_variant(planted_llama_dir, tmp_path_factory, "roles_llama", edit), device="cpu")


@pytest.fixture(scope="module")
def dense_only_llama(planted_llama_dir, tmp_path_factory):
    """PLANT's model with its neuron's down row made dense: a first-token neuron, no chain one."""

    def edit(sd, p):
        d = sd["model.embed_tokens.weight"].shape[1]
        sd[p + "down_proj.weight"][:, PLANT["neuron"]] = _dense_row(d, 3, scale=0.5)

    return tl_sinks.load_model(_save_variant(planted_llama_dir, tmp_path_factory, "dense_only_llama", edit), device="cpu")


def _prompts() -> list[list[int]]:
    prompts = random_prompts([20] * 10, seed=5, low=10)
    for i, pos in RARE_AT.items():
        prompts[i][pos] = RARE
    return prompts


def _labels(df) -> set[str]:
    return set(df["label"])


# --------------------------------------------------------------------------- the kernel
def test_super_neuron_roles_needs_both_position_and_sparsity():
    r = super_neuron_roles(
        first_mean_abs=[5.0, 5.0, 5.0, 0.1, 5.0],
        rest_max_abs=[1.0, 1.0, 1.0, 9.0, 5.0],
        down_kurtosis=[DEFAULT_MIN_KURTOSIS, 50.0, DEFAULT_MIN_KURTOSIS - 1e-3, 50.0, 50.0],
        top3_share=[DEFAULT_MIN_TOP3_SHARE, DEFAULT_MIN_TOP3_SHARE - 1e-3, 0.9, 0.9, 0.9],
    )
    assert list(r.columns) == ROLE_COLUMNS
    # Thresholds are inclusive; a tie between position 0 and elsewhere counts as position 0.
    assert r["role"].tolist() == ["chain", "first_token", "first_token", "other_position", "chain"]
    assert r["fires_at_first"].tolist() == [True, True, True, False, True]
    assert r["channel_sparse"].tolist() == [True, False, False, True, True]
    assert super_neuron_roles([], [], [], []).empty


@pytest.mark.parametrize("d", [32, 192, 384])
def test_dense_rows_are_never_channel_sparse_and_one_hot_rows_are(d):
    """The thresholds against their reference: Gaussian (dense) rows fail them at every width,
    including 32 where their top-3 share can pass 0.5 alone; a row with its norm in 1-3 dims passes
    (in 1-2 at d = 32: three even dims give kurtosis about d / 3 - 3, 7.7 there)."""
    g = torch.Generator().manual_seed(d)
    dense = torch.randn(2000, d, generator=g)
    sq = dense.pow(2)
    top3 = sq.topk(3, -1).values.sum(-1) / sq.sum(-1)
    sparse = (excess_kurtosis(dense) >= DEFAULT_MIN_KURTOSIS) & (top3 >= DEFAULT_MIN_TOP3_SHARE)
    assert not sparse.any()
    for k in (1, 2, 3) if d >= 40 else (1, 2):
        row = torch.randn(d, generator=g) * 0.01
        row[:k] = 1.0
        c = channel_concentration(row)
        assert float(excess_kurtosis(row)) >= DEFAULT_MIN_KURTOSIS and c["topk_share"] >= DEFAULT_MIN_TOP3_SHARE, k


# --------------------------------------------------------------------------- planted
def test_planted_neurons_get_their_roles(roles_llama):
    sn = tl_sinks.find_super_neurons(roles_llama, _prompts(), progress=False)
    f = sn.found.set_index("label")
    layer = PLANT["layer"]
    chain, first, other = (f"L{layer}N{n}" for n in (PLANT["neuron"], FIRST_DENSE, OTHER))
    assert set(f.index) == {chain, first, other}
    assert f.loc[chain, "role"] == "chain"
    assert f.loc[first, "role"] == "first_token"
    assert f.loc[other, "role"] == "other_position"
    # The roles follow from the measured properties, not from the labels.
    assert f.loc[chain, "max_pos"] == 0 and f.loc[chain, "top_dims"][0] == PLANT["massive_dim"]
    assert f.loc[first, "max_pos"] == 0 and not f.loc[first, "channel_sparse"]
    assert f.loc[first, "first_mean_abs"] >= f.loc[first, "rest_max_abs"]
    assert f.loc[other, "max_pos"] in set(RARE_AT.values()) and f.loc[other, "str_token"] == f"w{RARE - N_SPECIAL}"
    assert f.loc[other, "first_mean_abs"] < f.loc[other, "rest_max_abs"]
    assert f.loc[other, "down_kurtosis"] < 0 and f.loc[other, "top3_share"] < 0.2
    assert _labels(sn.chain) == {chain}
    assert _labels(sn.with_role("first_token", "other_position")) == {first, other}
    with pytest.raises(ValueError, match="unknown role"):
        sn.with_role("super")
    t = sn.ablation_targets()
    assert t.neurons == [(layer, PLANT["neuron"])] and t.selection == "chain"
    head = sn._summary_lines()[0]
    assert head.startswith(f"1 chain super neuron(s) (first token, channel-sparse): {chain}")
    assert f"1 first-token neuron(s) with a dense down row: {first}" in head
    assert f"1 other high-ratio neuron(s) (peak elsewhere): {other}" in head
    assert sn.meta["min_kurtosis"] == DEFAULT_MIN_KURTOSIS and sn.meta["min_top3_share"] == DEFAULT_MIN_TOP3_SHARE


def test_thresholds_are_parameters(roles_llama):
    sn = tl_sinks.find_super_neurons(roles_llama, _prompts(), min_top3_share=1.01, progress=False)
    assert sn.chain.empty
    t = sn.ablation_targets()
    assert t.selection == "first_token"
    assert sorted(t.neurons) == sorted([(PLANT["layer"], PLANT["neuron"]), (PLANT["layer"], FIRST_DENSE)])
    assert sn._summary_lines()[0].startswith("0 chain super neuron(s)")


def test_trace_chain_ablates_only_the_chain_super_neurons(roles_llama):
    t = trace_chain(roles_llama, _prompts(), pos=7, lambdas=(1.0,), progress=False)
    assert t.neurons == [(PLANT["layer"], PLANT["neuron"])]
    assert t.meta["ablation_selection"] == "chain" and t.meta["ablated"] == [f"L{PLANT['layer']}N{PLANT['neuron']}"]
    dim_row = t.links.iloc[0]
    assert dim_row["link"] == "super neurons -> massive dim"
    assert f"dim {PLANT['massive_dim']} at pos 0" in dim_row["metric"]
    # The massive dim goes; what is left is mostly the dense first-token neuron's small entry in
    # that dim (0.05 x its activation), which was not ablated.
    assert dim_row["baseline"] > 100 and dim_row["intervened"] < 0.05 * dim_row["baseline"]
    assert "chain super neurons: first token, channel-sparse" in t.report()


def test_trace_chain_falls_back_to_first_token_neurons_and_says_so(dense_only_llama):
    sn = tl_sinks.find_super_neurons(dense_only_llama, _prompts(), progress=False)
    assert sn.found["role"].tolist() == ["first_token"]
    t = trace_chain(dense_only_llama, _prompts(), pos=7, lambdas=(1.0,), progress=False)
    assert t.neurons == [(PLANT["layer"], PLANT["neuron"])]
    assert t.meta["ablation_selection"] == "first_token"
    assert "no chain super neuron" in t.meta["ablation_note"] and "no chain super neuron" in t.report()
    assert t.links.iloc[0]["link"] == "first-token neurons -> massive dim"


def test_neurons_given_are_ablated_as_given(roles_llama):
    given = [(PLANT["layer"], OTHER)]
    t = trace_chain(roles_llama, _prompts(), pos=7, lambdas=(1.0,), neurons=given, progress=False)
    assert t.neurons == given and t.meta["ablation_selection"] == "given"


# --------------------------------------------------------------------------- real models
def _check_roles(sn) -> None:
    """Every found neuron's role is what its measured properties say."""
    k, s = sn.meta["min_kurtosis"], sn.meta["min_top3_share"]
    for r in sn.found.itertuples():
        at_first = r.first_mean_abs >= r.rest_max_abs
        sparse = r.down_kurtosis >= k and r.top3_share >= s
        assert r.role == ("chain" if at_first and sparse else "first_token" if at_first else "other_position"), r.label
        if at_first:
            assert r.max_pos == 0, r.label


@pytest.mark.slow
def test_default_model_chain_is_the_two_bos_super_neurons():
    from tl_sinks.train.default_model import card_prompts

    model = tl_sinks.load_model("default", device="cpu")
    for prompts in (tl_sinks.builtin_prompts(), card_prompts(model.tokenizer)):
        sn = tl_sinks.find_super_neurons(model, prompts, batch_size=16, progress=False)
        _check_roles(sn)
        chain = sn.chain
        assert _labels(chain) == {"L0N504", "L2N168"}
        # Both fire at BOS, far above anything they do elsewhere, with channel-sparse rows that
        # share their top dims (the massive dim among them).
        assert (chain["max_pos"] == 0).all() and (chain["first_mean_abs"] > 10 * chain["rest_max_abs"]).all()
        assert (chain["down_kurtosis"] > 2 * sn.meta["min_kurtosis"]).all()
        assert (chain["top3_share"] > sn.meta["min_top3_share"]).all()
        assert all(81 in dims for dims in chain["top_dims"])
        # Every other neuron found peaks at an ordinary token after BOS, with a dense row.
        rest = sn.with_role("first_token", "other_position")
        assert len(rest) >= 3 and (rest["role"] == "other_position").all()
        assert (rest["max_pos"] >= 1).all() and (rest["down_kurtosis"] < 2).all() and (rest["top3_share"] < 0.25).all()
        assert sn._summary_lines()[0].startswith("2 chain super neuron(s) (first token, channel-sparse): L0N504, L2N168; ")


@pytest.mark.slow
def test_minilm_cls_super_neurons_are_all_chain(minilm):
    sn = tl_sinks.find_super_neurons(minilm, tl_sinks.builtin_prompts(), batch_size=16, progress=False)
    _check_roles(sn)
    assert _labels(sn.chain) == {"L0N856", "L1N607", "L2N1004", "L2N218", "L3N358"} == _labels(sn.found)
    assert (sn.chain["str_token"] == "[CLS]").all()
    assert all(dims[0] == 99 for dims in sn.chain["top_dims"]) and (sn.chain["top1_share"] > 0.9).all()
    assert sn.ablation_targets().selection == "chain"
