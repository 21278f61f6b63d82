"""Tiny random Hugging Face checkpoints, one per architecture family, for the family matrix.

Every builder makes a 2-layer model (hidden 32, 4 heads, vocab 128, 64 positions), re-draws its
weight matrices from N(0, 0.25^2) so attention is far from uniform (transformers' default
init, std 0.02, gives near-uniform patterns that would hide most bugs), and saves it with
``save_pretrained`` next to the word-level tokenizer of :func:`tests.helpers.build_tokenizer`,
which prepends BOS (``[CLS] ... [SEP]`` for the encoders).

Qwen2 is the exception to the word-level tokenizer: transformers 5 always loads a ``qwen2``
checkpoint's tokenizer as ``Qwen2Tokenizer`` (byte-level BPE), which turns a word-level
vocabulary into one that drops every word. Its family gets a character-level vocabulary that
``Qwen2Tokenizer`` reads back as saved (one token per letter or digit, BOS prepended), and
:meth:`Family.text` writes prompts in each family's own alphabet.

Nothing here imports tl_sinks: the checkpoints are built and read back with transformers only.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

from tests.helpers import BOS, EOS, N_SPECIAL, PAD, UNK, build_tokenizer, save_hf, word

VOCAB = 128
HIDDEN = 32
HEADS = 4
LAYERS = 2
POSITIONS = 64
FFN = 64
WEIGHT_STD = 0.25
CHARS = string.ascii_letters + string.digits  # the ordinary tokens of the character-level vocabulary


@dataclass(frozen=True)
class Family:
    """One architecture family: how to configure it and which model class saves it."""

    name: str
    model_cls: str  # attribute of ``transformers``
    config: Callable[[], object]
    causal: bool = True
    gqa: bool = False  # fewer key-value heads than query heads
    char_level: bool = False  # character-level tokenizer (see the module docstring)

    @property
    def n_words(self) -> int:
        """How many ordinary tokens the tokenizer has (ids ``N_SPECIAL ..``)."""
        return len(CHARS) if self.char_level else VOCAB - N_SPECIAL

    def text(self, ordinary: Sequence[int]) -> str:
        """A prompt whose tokens (after BOS) are ordinary tokens ``ordinary`` (ids ``N_SPECIAL + i``)."""
        if self.char_level:
            return "".join(CHARS[i] for i in ordinary)
        return " ".join(word(i) for i in ordinary)

    def tokenizer(self):
        if self.char_level:
            return _char_tokenizer()
        return build_tokenizer(VOCAB, cls_sep=not self.causal)


_TOKENS = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
_SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
_GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS)
_D_HEAD = HIDDEN // HEADS
# Shared by the Llama-like configs.
_LLAMA_LIKE = dict(
    **_SIZES, intermediate_size=FFN, num_key_value_heads=HEADS, max_position_embeddings=POSITIONS,
    tie_word_embeddings=False, **_TOKENS,
)


def _config(cls: str, base: dict, **kw) -> Callable[[], object]:
    return lambda: getattr(tf, cls)(**{**base, **kw})


def _llama_like(cls: str, **kw) -> Callable[[], object]:
    return _config(cls, _LLAMA_LIKE, **kw)


# Gemma 2/3 scale scores by query_pre_attn_scalar ** -0.5 (default 256, the real models'
# head_dim); with d_head 8 that would flatten attention, so it is set to d_head here.
_GEMMA_2_3 = dict(head_dim=_D_HEAD, query_pre_attn_scalar=_D_HEAD, sliding_window=POSITIONS)
_OPT = dict(**_SIZES, word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS, **_TOKENS)
_ENCODER = dict(**_SIZES, intermediate_size=FFN, pad_token_id=PAD)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gpt2", "GPT2LMHeadModel", _config("GPT2Config", _GPT2_SIZES, n_positions=POSITIONS, **_TOKENS)),
        Family("gpt_neox", "GPTNeoXForCausalLM", _config(
            "GPTNeoXConfig", _SIZES, intermediate_size=FFN, max_position_embeddings=POSITIONS, rotary_pct=0.5,
            tie_word_embeddings=False, **_TOKENS,
        )),
        Family("llama", "LlamaForCausalLM", _llama_like("LlamaConfig", num_key_value_heads=2), gqa=True),
        Family("mistral", "MistralForCausalLM", _llama_like("MistralConfig", num_key_value_heads=2), gqa=True),
        Family(
            "qwen2", "Qwen2ForCausalLM", _llama_like("Qwen2Config", num_key_value_heads=2), gqa=True, char_level=True
        ),
        Family("qwen3", "Qwen3ForCausalLM", _llama_like("Qwen3Config", head_dim=_D_HEAD)),
        Family("gemma", "GemmaForCausalLM", _llama_like("GemmaConfig", head_dim=_D_HEAD)),
        Family("gemma2", "Gemma2ForCausalLM", _llama_like("Gemma2Config", **_GEMMA_2_3)),
        Family("gemma3", "Gemma3ForCausalLM", _llama_like("Gemma3TextConfig", **_GEMMA_2_3)),  # text-only
        Family("phi", "PhiForCausalLM", _llama_like("PhiConfig", partial_rotary_factor=0.5)),
        Family("phi3", "Phi3ForCausalLM", _llama_like("Phi3Config")),
        Family("opt", "OPTForCausalLM", _config("OPTConfig", _OPT, ffn_dim=FFN)),  # ffn_dim = 2 * hidden
        Family("opt4x", "OPTForCausalLM", _config("OPTConfig", _OPT, ffn_dim=4 * HIDDEN)),
        Family("gptj", "GPTJForCausalLM", _config(
            "GPTJConfig", _GPT2_SIZES, n_positions=POSITIONS, rotary_dim=4, tie_word_embeddings=False, **_TOKENS
        )),
        Family("falcon", "FalconForCausalLM", _config(
            "FalconConfig", _SIZES, max_position_embeddings=POSITIONS, **_TOKENS  # multi-query attention
        )),
        Family("olmo", "OlmoForCausalLM", _llama_like("OlmoConfig")),
        Family("olmo2", "Olmo2ForCausalLM", _llama_like("Olmo2Config")),
        Family("stablelm", "StableLmForCausalLM", _llama_like("StableLmConfig")),
        Family("bloom", "BloomForCausalLM", _config(
            "BloomConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS), **_TOKENS
        )),
        Family(
            "bert", "BertForMaskedLM", _config("BertConfig", _ENCODER, max_position_embeddings=POSITIONS), causal=False
        ),
        # RoBERTa's positions start after the pad id (padding_idx + 1).
        Family(
            "roberta", "RobertaForMaskedLM",
            _config(
                "RobertaConfig", _ENCODER, max_position_embeddings=POSITIONS + 2, bos_token_id=BOS, eos_token_id=EOS
            ),
            causal=False,
        ),
    ]
}


def _char_tokenizer():
    """``<pad> <s> </s> <unk>``, then one token per character of :data:`CHARS`; prepends ``<s>``."""
    from tokenizers import processors
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + list(CHARS))}
    names = dict(bos_token=special[BOS], eos_token=special[EOS], unk_token=special[UNK], pad_token=special[PAD])
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], **names)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{special[BOS]} $A", special_tokens=[(special[BOS], BOS)]
    )
    return tok


def redraw_weights(model: torch.nn.Module, *, std: float = WEIGHT_STD, seed: int = 0) -> None:
    """Re-draw every weight matrix (2-D parameter) from N(0, std^2), in place.

    Biases and norm gains keep their initial values (0 and 1), so the model stays well formed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_family(name: str, path: Path, *, seed: int = 0) -> Path:
    """Build family ``name``'s tiny random checkpoint and its tokenizer under ``path``."""
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = fam.config()
    model = getattr(tf, fam.model_cls)(cfg).eval()
    redraw_weights(model, seed=seed)
    return save_hf(model, fam.tokenizer(), path)


__all__ = ["CHARS", "FAMILIES", "Family", "VOCAB", "build_family", "redraw_weights"]
