"""``scan`` and ``trace_chain`` with default arguments on the families that broke them (issue 13).

* (A) GPT-NeoX and Qwen2, where TransformerLens sets ``default_prepend_bos=False``: the defaults
  follow the checkpoint's own tokenizer. One that adds BOS gets BOS; one that adds none (Pythia's
  defines a BOS it never adds, Qwen's has none at all) has position 0 analysed as it is, and
  ``meta["first_token"]`` says so. Sink numbers equal plain transformers (eager attention) on the
  ids the checkpoint's tokenizer gives.
* (B) OPT with ``ffn_dim = 2 * hidden``: TransformerLens' ``cfg.d_mlp`` says ``4 * hidden``; the
  super-neuron stage is sized from ``mlp.hook_post`` and equals the ``fc2`` input HF computes.
* (C) OLMo 2 has no norm before attention (no ``ln1.hook_out``): the attention-input ratio is
  read at ``attn.hook_in``, the raw residual stream, equal to HF's ``hidden_states[l]``.

The checkpoints are built here (tiny, random, weights re-drawn from N(0, 0.25^2) so attention is
far from uniform) and read back through ``tl_sinks.load_model``; the references use transformers
only.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import tl_sinks
from tests.conftest import seed_all, sharpen
from tests.helpers import BOS, EOS, N_SPECIAL, PAD, UNK, build_tokenizer, save_hf, word
from tl_sinks.interventions import AblateNeurons
from tl_sinks.trace import trace_chain

VOCAB = 64
CHARS = string.ascii_lowercase + string.digits  # the character-level vocabulary's ordinary tokens
ORDINARY = [[3, 17, 8, 30, 22, 5, 11], [9, 30, 2, 14], [6, 25, 19, 1, 33]]
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
_TOKENS = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
SOURCE_BOS = "tokenizer adds BOS"
SOURCE_NO_BOS = "tokenizer adds no BOS: position 0 analysed as it is"


# --------------------------------------------------------------------------- tokenizers
def _word_tokenizer(*, adds_bos: bool):
    """Word-level ``<pad> <s> </s> <unk> w0 w1 ...``; without BOS it defines ``<s>`` and never adds it (as Pythia's)."""
    if adds_bos:
        return build_tokenizer(VOCAB)
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)}
    for i in range(VOCAB - N_SPECIAL):
        vocab[word(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[UNK]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special[BOS], eos_token=special[EOS], unk_token=special[UNK], pad_token=special[PAD]
    )


def _char_tokenizer(*, adds_bos: bool):
    """Qwen2Tokenizer over one token per character; without BOS it has no BOS token at all (as Qwen's)."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + list(CHARS))}
    vocab.update({f"<extra{i}>": i for i in range(len(vocab), VOCAB)})
    names = dict(eos_token=special[EOS], unk_token=special[UNK], pad_token=special[PAD])
    if not adds_bos:
        return Qwen2Tokenizer(vocab=vocab, merges=[], bos_token=None, **names)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], bos_token=special[BOS], **names)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{special[BOS]} $A", special_tokens=[(special[BOS], BOS)]
    )
    return tok


# --------------------------------------------------------------------------- checkpoints
def _configs() -> dict[str, tuple[str, object, bool]]:
    """family -> (model class, config, character-level tokenizer)."""
    llama_like = dict(**_SIZES, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return {
        "gpt_neox": ("GPTNeoXForCausalLM", tf.GPTNeoXConfig(
            **_SIZES, intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5, tie_word_embeddings=False,
            **_TOKENS), False),
        "qwen2": ("Qwen2ForCausalLM", tf.Qwen2Config(**llama_like, num_key_value_heads=2, **_TOKENS), True),
        "opt": ("OPTForCausalLM", tf.OPTConfig(
            **_SIZES, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, **_TOKENS), False),
        "olmo2": ("Olmo2ForCausalLM", tf.Olmo2Config(**llama_like, num_key_value_heads=4, **_TOKENS), False),
    }


def _build(root: Path, family: str, adds_bos: bool, seed: int) -> Path:
    cls, cfg, char_level = _configs()[family]
    seed_all(seed)
    model = sharpen(getattr(tf, cls)(cfg).eval())
    tok = _char_tokenizer(adds_bos=adds_bos) if char_level else _word_tokenizer(adds_bos=adds_bos)
    return save_hf(model, tok, root / f"{family}_{'bos' if adds_bos else 'nobos'}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("families_defaults")
    built: dict[tuple[str, bool], tuple[Path, object]] = {}

    def get(family: str, adds_bos: bool = True):
        key = (family, adds_bos)
        if key not in built:
            path = _build(root, family, adds_bos, seed=20 + len(built))
            built[key] = (path, tl_sinks.load_model(path, device="cpu"))
        return built[key]

    return get


def _texts(family: str) -> list[str]:
    if _configs()[family][2]:
        return ["".join(CHARS[i] for i in p) for p in ORDINARY]
    return [" ".join(word(i) for i in p) for p in ORDINARY]


# --------------------------------------------------------------------------- references
def _hf_run(path: Path, ids: list[list[int]]):
    """Plain transformers, eager attention, one unpadded prompt at a time."""
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    outs = []
    with torch.no_grad():
        for p in ids:
            outs.append(hf(torch.tensor([p]), output_attentions=True, output_hidden_states=True))
    return hf, outs


def _received(attentions, lengths):
    """Mean attention each key gets from the queries at or after it, averaged over prompts (causal)."""
    L, H, P = len(attentions[0]), attentions[0][0].shape[1], max(lengths)
    total = torch.zeros(L, H, P, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    for att, T in zip(attentions, lengths):
        for k in range(T):
            n[k] += 1
            for layer in range(L):
                total[layer, :, k] += att[layer][0, :, k:T, k].double().mean(-1)
    return total / n


def _own_ids(path: Path, texts: list[str]) -> list[list[int]]:
    """What the checkpoint's own tokenizer gives, straight from its files."""
    tok = AutoTokenizer.from_pretrained(path)
    return [list(tok(t)["input_ids"]) for t in texts]


# --------------------------------------------------------------------------- (A) first token
@pytest.mark.parametrize("family", ["gpt_neox", "qwen2"])
@pytest.mark.parametrize("adds_bos", [True, False], ids=["tokenizer_adds_bos", "tokenizer_adds_no_bos"])
def test_scan_defaults_follow_the_checkpoint_tokenizer(checkpoint, family, adds_bos):
    path, model = checkpoint(family, adds_bos)
    assert model.cfg.default_prepend_bos is False  # TransformerLens' default for these families
    texts = _texts(family)
    ids = _own_ids(path, texts)
    assert all((p[0] == BOS) == adds_bos for p in ids)  # the fixtures are what they claim
    result = tl_sinks.scan(model, texts, batch_size=2, progress=False)
    ft = result.meta["first_token"]
    assert ft["source"] == (SOURCE_BOS if adds_bos else SOURCE_NO_BOS)
    assert ft["prepend_bos"] is adds_bos and ft["require_bos"] is adds_bos
    if adds_bos or family == "gpt_neox":
        assert ft["bos_token_id"] == BOS  # Pythia-like: a BOS is defined, just never added
    else:
        assert ft["bos_token_id"] is None  # Qwen-like: no BOS token at all
    assert result.meta["pos0_is_bos"] is adds_bos
    assert result.meta["n_tokens"] == sum(len(p) for p in ids)
    _, outs = _hf_run(path, ids)
    expected = _received([o.attentions for o in outs], [len(p) for p in ids])
    torch.testing.assert_close(result.sinks.values.double(), expected, rtol=1e-4, atol=1e-6)
    # Position 0 is where the sink statistics are read, with or without BOS.
    assert result.summary()["mean_received_pos0"] == pytest.approx(float(expected[:, :, 0].mean()), rel=1e-4)


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2"])
def test_token_id_prompts_without_bos_run_when_the_tokenizer_adds_none(checkpoint, family):
    path, model = checkpoint(family, False)
    ids = _own_ids(path, _texts(family))
    result = tl_sinks.scan(model, ids, stages=["sinks"], progress=False)
    assert result.meta["first_token"]["source"] == SOURCE_NO_BOS
    assert result.meta["first_token"]["prepend_bos"] is None  # ids given: nothing prepended
    _, outs = _hf_run(path, ids)
    torch.testing.assert_close(
        result.sinks.values.double(), _received([o.attentions for o in outs], [len(p) for p in ids]), rtol=1e-4, atol=1e-6
    )


def test_explicit_arguments_still_win(checkpoint):
    path, model = checkpoint("gpt_neox", False)
    texts = _texts("gpt_neox")
    with pytest.raises(ValueError, match="do not start with BOS"):
        tl_sinks.scan(model, texts, require_bos=True, progress=False)
    with pytest.raises(ValueError, match="do not start with BOS"):
        tl_sinks.scan(model, _own_ids(path, texts), require_bos=True, progress=False)
    r = tl_sinks.scan(model, texts, prepend_bos=True, stages=["sinks"], progress=False)
    assert r.meta["pos0_is_bos"] is True and r.meta["first_token"]["source"] == "user"
    assert r.meta["n_tokens"] == sum(len(p) + 1 for p in _own_ids(path, texts))
    # A tokenizer that adds BOS keeps refusing ids without it, unless told otherwise.
    _, with_bos = checkpoint("gpt_neox", True)
    with pytest.raises(ValueError, match="do not start with BOS"):
        tl_sinks.scan(with_bos, [[10, 11, 12, 13]], progress=False)
    r = tl_sinks.scan(with_bos, [[10, 11, 12, 13]], require_bos=False, stages=["sinks"], progress=False)
    assert r.meta["pos0_is_bos"] is False and r.meta["first_token"]["source"] == "user"


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2"])
def test_each_stage_and_the_cli_follow_the_tokenizer_too(checkpoint, family, tmp_path, capsys):
    # The per-stage entry points and `tl-sinks scan` used to pass require_bos=True explicitly.
    from tl_sinks import cli

    path, model = checkpoint(family, False)
    texts = _texts(family)
    whole = tl_sinks.scan(model, texts, batch_size=2, progress=False)
    sinks = tl_sinks.compute_sink_scores(model, texts, batch_size=2, progress=False)
    torch.testing.assert_close(sinks.values, whole.sinks.values)
    agg = tl_sinks.compute_value_aggregation(model, texts, batch_size=2, progress=False)
    torch.testing.assert_close(agg.values, whole.aggregation.values)
    sn = tl_sinks.find_super_neurons(model, texts, batch_size=2, progress=False)
    torch.testing.assert_close(sn.values, whole.super_neurons.values)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "scan.json"
    assert cli.main(["scan", "--model", str(path), "--prompts", str(prompts), "--json", str(out), "--no-progress"]) == 0
    import json

    meta = json.loads(out.read_text(encoding="utf-8"))["meta"]
    assert meta["first_token"]["source"] == SOURCE_NO_BOS


@pytest.mark.parametrize(
    ("family", "adds_bos"), [("gpt_neox", True), ("gpt_neox", False), ("qwen2", False)]
)
def test_trace_chain_runs_with_defaults(checkpoint, family, adds_bos):
    _, model = checkpoint(family, adds_bos)
    tr = trace_chain(model, _texts(family), lambdas=(2.0,), progress=False)
    assert tr.meta["first_token"]["source"] == (SOURCE_BOS if adds_bos else SOURCE_NO_BOS)
    assert len(tr.sweep) == model.cfg.n_layers * 4


# --------------------------------------------------------------------------- (B) OPT widths
def test_opt_mlp_width_comes_from_the_hooked_tensor(checkpoint):
    path, model = checkpoint("opt")
    assert model.cfg.d_mlp == 128  # TransformerLens' config: 4 * hidden, whatever ffn_dim says
    info = tl_sinks.inspect_model(model)
    assert (info.d_mlp, info.d_model) == (64, 32)
    texts = _texts("opt")
    result = tl_sinks.scan(model, texts, progress=False)
    ids = _own_ids(path, texts)
    # Independent: the input of HF's fc2 (the activation output), seen by a torch hook.
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    peaks: list[list[torch.Tensor]] = []
    for p in ids:
        seen: list[torch.Tensor] = []
        handles = [
            layer.fc2.register_forward_pre_hook(lambda m, args, s=seen: s.append(args[0].detach().reshape(-1, args[0].shape[-1])))
            for layer in hf.model.decoder.layers
        ]
        try:
            with torch.no_grad():
                hf(torch.tensor([p]))
        finally:
            for h in handles:
                h.remove()
        peaks.append([x.abs().amax(0) for x in seen])
    expected = torch.stack([torch.stack([pk[layer] for pk in peaks]).amax(0) for layer in range(2)])
    assert result.super_neurons.max_abs.shape == (2, 64)
    torch.testing.assert_close(result.super_neurons.max_abs, expected, rtol=1e-5, atol=1e-6)
    w = tl_sinks.find_super_neurons_by_weights(model, top_k=2)
    assert w.values.shape == (2, 64)
    # Interventions check neuron indices against the true width.
    with pytest.raises(ValueError, match="out of range for d_mlp=64"):
        tl_sinks.scan(model, texts, stages=["sinks"], interventions=[AblateNeurons(neurons=((0, 100),), pos=0)], progress=False)
    trace_chain(model, texts, lambdas=(2.0,), progress=False)


# --------------------------------------------------------------------------- (C) OLMo 2
def test_olmo2_attention_input_is_the_raw_residual(checkpoint):
    path, model = checkpoint("olmo2")
    assert "blocks.0.ln1.hook_out" not in model.hook_dict
    texts = _texts("olmo2")
    result = tl_sinks.scan(model, texts, progress=False)
    d = result.disparity
    assert d.meta["attn_in_site"].startswith("blocks.{L}.attn.hook_in")
    assert "raw residual" in d.meta["attn_in_site"] and "not a norm output" in d.meta["attn_in_site"]
    assert d.meta["attn_in_is_norm_output"] is False
    assert "no norm before attention" in result.report()
    # Independent: HF's hidden_states[l] is layer l's input, which OLMo 2's attention reads as is.
    ids = _own_ids(path, texts)
    _, outs = _hf_run(path, ids)
    P = max(len(p) for p in ids)
    ratio = torch.zeros(2, P, dtype=torch.float64)
    n = torch.zeros(P, dtype=torch.float64)
    for p, o in zip(ids, outs):
        n[: len(p)] += 1
        for layer in range(2):
            a = o.hidden_states[layer][0].double().abs()
            top = a.amax(-1)
            ratio[layer, : len(p)] += top / ((a.sum(-1) - top) / (a.shape[-1] - 1))
    torch.testing.assert_close(d.attn_in_paper_ratio.double(), ratio / n, rtol=1e-4, atol=1e-5)
    # The residual-stream ratio stays where it was: after each block.
    tr = trace_chain(model, texts, lambdas=(2.0,), neurons=[(0, 3)], progress=False)
    assert tr.meta["attn_in_site"].startswith("blocks.{L}.attn.hook_in")
    disp = tr.links[tr.links.link == "-> dimension disparity"].iloc[0]
    assert "raw residual" in disp["metric"]
    trace_chain(model, texts, lambdas=(2.0,), progress=False)


def test_pre_ln_models_still_read_the_norm_output(checkpoint):
    _, model = checkpoint("gpt_neox")
    d = tl_sinks.scan(model, _texts("gpt_neox"), stages=["disparity"], progress=False).disparity
    assert d.meta["attn_in_site"].startswith("blocks.{L}.ln1.hook_out")
    assert d.meta["attn_in_is_norm_output"] is True
