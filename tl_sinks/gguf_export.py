"""Export a Llama-architecture Hugging Face checkpoint to a GGUF file (llama.cpp's format).

:func:`export_gguf` writes what ``llama.cpp``'s ``convert_hf_to_gguf.py`` writes for a Llama, and
what transformers' GGUF loader reads back (so :func:`tl_sinks.load_model` loads the file):

* metadata: ``general.*`` (architecture ``llama``, name, file type, quantization version) and the
  ``llama.*`` hyperparameters (context length, widths, block count, heads, kv heads, RMSNorm eps,
  rope base and dimension count, vocab size);
* the tokenizer: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) with tokens, merges, token
  types, the special token ids and whether BOS / EOS are added. The file is checked after writing:
  the tokenizer transformers builds from it must give the same ids as the checkpoint's own on a
  set of probe strings, or nothing is written;
* the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q/k/v/output``,
  ``blk.N.ffn_gate/up/down``, ``blk.N.attn_norm``, ``blk.N.ffn_norm``, ``output_norm``,
  ``output``), with the rotary row permutation llama.cpp applies to ``attn_q`` / ``attn_k``
  (pairs of rows interleaved per head; transformers undoes it on load). A tied checkpoint writes no
  ``output`` tensor, which is how a GGUF says the head is tied.

Quantization follows llama.cpp: 1-D tensors (the norms) stay F32; with ``"Q8_0"`` a matrix whose
rows are not a multiple of the 32-value block falls back to F16.

The output is written atomically: to a temporary file in the destination's directory, checked,
then moved over the destination with :func:`os.replace`.

Needs the optional ``gguf`` package: ``pip install 'tl_sinks[gguf]'``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Quantization = Literal["F32", "F16", "Q8_0"]
QUANTIZATIONS: tuple[str, ...] = ("F32", "F16", "Q8_0")

# Strings the written tokenizer must encode exactly as the checkpoint's own does.
PROBE_STRINGS: tuple[str, ...] = (
    "Hello world",
    " The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. It is 2024!",
    "  two leading spaces,\ttabs\tand\nnew\n\nlines  ",
    "numbers 0 12 345 6789 and punctuation: (a), [b]; {c}?",
    "unicode: caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600",
    "it's don't we'll they've I'm",
    "",
)

# HF Llama parameter name (after ``model.layers.N.``) -> llama.cpp tensor name (after ``blk.N.``).
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "exporting GGUF files needs the optional 'gguf' package: pip install 'tl_sinks[gguf]'"
        ) from e
    return gguf


# --------------------------------------------------------------------------- tensors
def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp stores ``q_proj`` / ``k_proj`` in (``n_head``: query or kv heads).

    HF's rotary embedding rotates the two halves of each head (``rotate_half``); llama.cpp's rotates
    adjacent pairs. Per head, row ``i`` of the first half and row ``i`` of the second half become
    rows ``2i`` and ``2i + 1``. transformers' GGUF loader applies the inverse.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a HF Llama parameter (``None`` for one GGUF does not store)."""
    base, _, suffix = hf_name.rpartition(".")
    if base in _TOP_TENSORS:
        return f"{_TOP_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        leaf = _LAYER_TENSORS.get(".".join(parts[3:]))
        if leaf is not None:
            return f"blk.{parts[2]}.{leaf}.{suffix}"
    return None


def _storage_type(gguf: Any, name: str, array: np.ndarray, quantization: str) -> Any:
    """The ggml type a tensor is stored in, as llama.cpp chooses it."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or quantization == "F32":
        return Q.F32
    if quantization == "Q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _encode(gguf: Any, array: np.ndarray, qtype: Any) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


# --------------------------------------------------------------------------- checkpoint
def _check_config(cfg: dict[str, Any], config_path: Path) -> None:
    """Refuse what a GGUF ``llama`` file cannot say (transformers would load a different model)."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        raise ValueError(
            f"{config_path}: export_gguf writes Llama-architecture checkpoints (LlamaForCausalLM); "
            f"this one is model_type={cfg.get('model_type')!r}, architectures={archs}"
        )
    variant = cfg.get("tl_sinks_attention")
    if variant not in (None, "softmax"):
        raise ValueError(
            f"{config_path}: tl_sinks attention variant {variant!r} has no GGUF form "
            "(a GGUF 'llama' file is plain softmax attention)"
        )
    refused = []
    if cfg.get("attention_bias"):
        refused.append("attention_bias=true")
    if cfg.get("mlp_bias"):
        refused.append("mlp_bias=true")
    if cfg.get("hidden_act", "silu") != "silu":
        refused.append(f"hidden_act={cfg.get('hidden_act')!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        refused.append(f"rope_type={rope_type!r}")
    if refused:
        raise ValueError(
            f"{config_path}: {', '.join(refused)} cannot be written to a GGUF 'llama' file that transformers "
            "reads back the same (only unbiased SiLU Llamas with default rotary embeddings)"
        )


def _load_checkpoint(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The HF Llama in float32 and its config.json, with load_model's file and loading checks."""
    from transformers import LlamaForCausalLM

    from tl_sinks.loading import _check_loading_report, _check_local_files, _read_config, _Where

    cfg = _read_config(model_dir)
    _check_config(cfg, model_dir / "config.json")
    files, shapes = _check_local_files(model_dir)
    where = _Where(str(model_dir), model_dir, files, shapes)
    model, info = LlamaForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True, weights_only=True
    )
    _check_loading_report(model, info, where)
    return model.eval(), cfg


# --------------------------------------------------------------------------- tokenizer
def _byte_level_pre(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level pre-tokenizer transformers rebuilds
    the same from a GGUF, or ``None``."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        # GPT-2's own regex, which transformers' GGUF byte-level tokenizer uses by default.
        ok = pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
        return "gpt2" if ok else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return next((name for name, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)


def _tokenizer_fields(tokenizer: Any, vocab_size: int, where: str) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields for a byte-level BPE tokenizer (``ValueError`` otherwise)."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{where}: a slow (Python) tokenizer cannot be exported; save a fast tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre_name = _byte_level_pre(spec.get("pre_tokenizer"))
    if (
        model.get("type") != "BPE"
        or pre_name is None
        or spec.get("normalizer") is not None
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        what = model.get("type", "unknown")
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        raise ValueError(
            f"{where}: a {what} tokenizer (pre-tokenizer {pre}, normalizer "
            f"{(spec.get('normalizer') or {}).get('type')}) has no GGUF form transformers reads back the same; "
            "export_gguf writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2')"
        )
    ids: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    ids.update({i: a["content"] for i, a in added.items()})
    n = max(ids) + 1
    if n > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in ids:  # a gap, or rows of the embedding no token uses (llama.cpp pads the same way)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(ids[i])
        a = added.get(i)
        types.append(T.NORMAL if a is None else (T.CONTROL if a.get("special") else T.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{where}: a BPE merge holds a space, which GGUF's space-separated merges cannot store")
    with_special = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")
    }
    return {
        "pre": pre_name,
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": merges,
        "special": {k: int(v) for k, v in special.items() if v is not None},
        "add_bos": special["bos"] is not None and with_special[:1] == [special["bos"]] and plain[:1] != [special["bos"]],
        "add_eos": special["eos"] is not None and with_special[-1:] == [special["eos"]] and plain[-1:] != [special["eos"]],
    }


def _write_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["merges"]:
        writer.add_token_merges(fields["merges"])
    special = fields["special"]
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if name in special:
            add(special[name])
    writer.add_add_bos_token(bool(fields["add_bos"]))
    writer.add_add_eos_token(bool(fields["add_eos"]))


def _verify_tokenizer(path: Path, original: Any, dest: Path) -> None:
    """The tokenizer transformers builds from ``path`` must encode :data:`PROBE_STRINGS` as ``original``."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    specials = [t for t in (original.bos_token, original.eos_token) if t]
    for text in (*PROBE_STRINGS, *(f"{t} x {t}" for t in specials)):
        want, got = original.encode(text), rebuilt.encode(text)
        if want != got:
            raise ValueError(
                f"not writing {dest}: the tokenizer transformers reads back from the GGUF encodes {text!r} as "
                f"{got[:12]}, the checkpoint's as {want[:12]}"
            )


# --------------------------------------------------------------------------- writing
def _write(path: Path, cfg: dict[str, Any], model: Any, tok_fields: dict[str, Any], quantization: str, name: str) -> Counter:
    gguf = _gguf()
    n_heads = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(int(file_type[quantization]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(int(cfg["vocab_size"]))
        writer.add_context_length(int(cfg["max_position_embeddings"]))
        writer.add_embedding_length(hidden)
        writer.add_block_count(int(cfg["num_hidden_layers"]))
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_heads)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        _write_tokenizer(writer, tok_fields)

        state = model.state_dict()
        if cfg.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # no `output` tensor: the GGUF way of saying "tied"
        counts: Counter = Counter()
        for hf_name, tensor in state.items():
            gguf_name = tensor_name(hf_name)
            if gguf_name is None:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"{hf_name} has no llama.cpp tensor name (not a plain Llama parameter)")
            array = tensor.detach().to(torch.float32).cpu().numpy()
            if gguf_name.endswith("attn_q.weight"):
                array = llama_cpp_permute(array, n_heads)
            elif gguf_name.endswith("attn_k.weight"):
                array = llama_cpp_permute(array, n_kv)
            qtype = _storage_type(gguf, gguf_name, array, quantization)
            data = _encode(gguf, array, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            counts[qtype.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return counts


def export_gguf(
    hf_model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    quantization: Quantization = "F32",
    name: str | None = None,
) -> Path:
    """Write a Llama-architecture checkpoint as a GGUF file that ``tl_sinks.load_model`` loads.

    Args:
        hf_model_dir: A Hugging Face model directory (``config.json``, safetensors or ``.bin``
            weights, a fast byte-level BPE ``tokenizer.json``), e.g.
            ``tl_sinks.train.paths.default_model_path()``.
        out_path: The ``.gguf`` file to write (replaced atomically if it exists).
        quantization: ``"F32"`` (lossless for fp32 and fp16 checkpoints), ``"F16"`` or
            ``"Q8_0"`` (8-bit blocks of 32 values with one fp16 scale: ~8.5 bits per weight).
            Norm weights always stay F32.
        name: ``general.name`` (default: the directory's name).

    Returns:
        ``out_path``.

    Raises:
        ImportError: The ``gguf`` package is not installed.
        ValueError: Not a plain Llama checkpoint (other architecture, tl_sinks attention variant,
            biases, scaled rotary embeddings), a tokenizer GGUF cannot hold, or a written tokenizer
            that does not encode like the checkpoint's (nothing is written then).
        tl_sinks.errors.ModelLoadError: Broken checkpoint files (as ``load_model`` checks them).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    _gguf()
    from transformers import AutoTokenizer

    from tl_sinks._io import _fsync_dir, _temp_path

    model_dir = Path(hf_model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    dest = Path(os.path.realpath(os.fspath(out_path)))
    if dest.is_dir():
        raise ValueError(f"{out_path} is a directory; pass the .gguf file to write")
    if not dest.parent.is_dir():
        raise ValueError(f"{dest.parent} does not exist (the directory to write {dest.name} in)")
    model, cfg = _load_checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    fields = _tokenizer_fields(tokenizer, int(cfg["vocab_size"]), str(model_dir))
    tmp = _temp_path(dest)
    try:
        _write(tmp, cfg, model, fields, quantization, name or model_dir.name)
        _verify_tokenizer(tmp, tokenizer, dest)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return Path(out_path)
