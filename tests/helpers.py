"""Builders and independent reference computations for the tests.

Nothing here imports tl_sinks: the references must not share code with what they check.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = 0, 1, 2, 3
N_SPECIAL = 4


def word(i: int) -> str:
    """The text of ordinary token ``N_SPECIAL + i`` in :func:`build_tokenizer`'s vocabulary."""
    return f"w{i}"


def build_tokenizer(vocab_size: int, *, cls_sep: bool = False):
    """Word-level tokenizer: four special tokens, then ``w0, w1, ...``.

    Decoder style (default): ``<pad> <s> </s> <unk>``, prepends ``<s>``. BERT style
    (``cls_sep``): a real ``BertTokenizerFast`` over ``[PAD] [CLS] [SEP] [UNK]`` that wraps text
    as ``[CLS] ... [SEP]``, as BERT checkpoints ship.
    """
    if cls_sep:
        from transformers import BertTokenizerFast

        words = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] + [word(i) for i in range(vocab_size - N_SPECIAL)]
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, mask_token="[UNK]")
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)}
    for i in range(vocab_size - N_SPECIAL):
        vocab[word(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[UNK]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{special[BOS]} $A", special_tokens=[(special[BOS], BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special[BOS], eos_token=special[EOS], unk_token=special[UNK], pad_token=special[PAD]
    )


def save_hf(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- Llama reference
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def llama_reference(
    sd: dict[str, torch.Tensor], cfg: object, tokens: list[int], *, self_only: int | None = None
) -> dict[str, list[torch.Tensor]]:
    """Hand-written Llama forward pass on one unpadded prompt, from a HF state dict.

    Returns per layer: ``pattern [head, q, k]``, ``z [pos, head, d_head]`` (attention output
    before o_proj), ``post [pos, d_mlp]`` (down_proj input), ``resid_post [pos, d_model]``,
    ``attn_in [pos, d_model]`` (input_layernorm output), ``attn_out``, ``mlp_out``, and
    ``embed [pos, d_model]``. With ``self_only=p`` query ``p`` may attend only to key ``p``
    (the paper's mask intervention), in every layer.
    """
    H = cfg.num_attention_heads
    KV = cfg.num_key_value_heads
    D = cfg.hidden_size // H
    eps = cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    T = len(tokens)
    ids = torch.tensor(tokens)
    x = sd["model.embed_tokens.weight"][ids].double()
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2).double() / D))
    freqs = torch.outer(torch.arange(T).double(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("pattern", "z", "post", "resid_post", "attn_in", "attn_out", "mlp_out")}
    final_norm = sd["model.norm.weight"].double()
    out["embed"] = [x.clone()]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        w = lambda n: sd[p + n].double()  # noqa: E731
        h = _rms(x, w("input_layernorm.weight"), eps)
        out["attn_in"].append(h)
        q = (h @ w("self_attn.q_proj.weight").T).view(T, H, D)
        k = (h @ w("self_attn.k_proj.weight").T).view(T, KV, D)
        v = (h @ w("self_attn.v_proj.weight").T).view(T, KV, D)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        rep = H // KV
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        if self_only is not None:
            mask[self_only, :] = True
            mask[self_only, self_only] = False
        scores = scores.masked_fill(mask, float("-inf"))
        pattern = scores.softmax(-1)
        z = torch.einsum("hqk,khd->qhd", pattern, v)
        attn_out = z.reshape(T, H * D) @ w("self_attn.o_proj.weight").T
        x = x + attn_out
        h2 = _rms(x, w("post_attention_layernorm.weight"), eps)
        gate = h2 @ w("mlp.gate_proj.weight").T
        up = h2 @ w("mlp.up_proj.weight").T
        post = torch.nn.functional.silu(gate) * up
        mlp_out = post @ w("mlp.down_proj.weight").T
        x = x + mlp_out
        for name, t in (("pattern", pattern), ("z", z), ("post", post), ("resid_post", x.clone()), ("attn_out", attn_out), ("mlp_out", mlp_out)):
            out[name].append(t)
    unembed = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).double()
    out["logits"] = [_rms(x, final_norm, eps) @ unembed.T]
    return out


def lower_median(x: torch.Tensor) -> torch.Tensor:
    """Lower median over the last dim, by sorting (independent of ``torch.median``)."""
    s, _ = torch.sort(x, dim=-1)
    return s[..., (x.shape[-1] - 1) // 2]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page: str, tmp_path: Path, *args: str) -> str:
    """Open ``page`` in headless Chromium with no network; return its stdout (e.g. ``--dump-dom``)."""
    assert CHROMIUM is not None, "TL_SINKS_REQUIRE_BROWSER is set but chromium is not installed"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "page.html"
    path.write_text(page, encoding="utf-8")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=10000", *args, path.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
