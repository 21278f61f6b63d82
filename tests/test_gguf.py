"""GGUF: tl_sinks' exporter (``tl_sinks.gguf_export``) and loading ``.gguf`` files with ``load_model``.

No GGUF can be downloaded here, so the files are written by the exporter from tiny Llama
checkpoints (and, marked slow, from the shipped default model) and read back through
transformers' GGUF loader. The references are independent of the exporter: F16 is the original
weights rounded to half precision, Q8_0 is the block quantization re-implemented below in torch
from the GGUF spec (blocks of 32 values along a row, scale ``max|x| / 127`` stored as fp16, codes
rounded half away from zero).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

import tl_sinks  # noqa: E402
from tests.conftest import llama_config, seed_all, sharpen  # noqa: E402
from tl_sinks import gguf_export  # noqa: E402
from tl_sinks.errors import ModelLoadError  # noqa: E402
from tl_sinks.gguf_export import export_gguf  # noqa: E402

PROBES = [
    "Hello world",
    "The capital of France is Paris.",
    "  spaces,\ttabs and\nnew lines ",
    "caf\u00e9 \u65e5\u672c \U0001f600 123456",
    "<s> a special token in text </s>",
]


# --------------------------------------------------------------------------- fixtures
def byte_bpe_tokenizer(n_merges: int = 40):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer, prepends ``<s>``) trained on the built-in prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=3 + 256 + n_merges,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tl_sinks.builtin_prompts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_llama(path: Path, *, seed: int, extra_rows: int = 5, **config) -> Path:
    """Tiny sharpened Llama (GQA: 4 query heads, 2 kv heads) with a byte-level BPE tokenizer.

    The embedding has ``extra_rows`` more rows than the tokenizer has tokens (models pad their
    vocabulary), which the GGUF fills with unused placeholder tokens.
    """
    from transformers import LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer()
    seed_all(seed)
    cfg = llama_config(vocab_size=len(tokenizer) + extra_rows, bos_token_id=1, eos_token_id=2, pad_token_id=0, **config)
    model = sharpen(LlamaForCausalLM(cfg))  # far from uniform attention: a wrong q/k row order shows
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bpe_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("bpe_llama"), seed=21)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tied_llama"), seed=22, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def exported(bpe_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The untied tiny Llama written once in each quantization."""
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(bpe_llama_dir, out / f"tiny-{q}.gguf", quantization=q) for q in gguf_export.QUANTIZATIONS}


@pytest.fixture(scope="module")
def reference(bpe_llama_dir: Path):
    return tl_sinks.load_model(bpe_llama_dir, device="cpu")


def tokens_for(model) -> torch.Tensor:
    return model.to_tokens(["The cat sat on the mat and looked at the door.", "Paris is the capital of France, the"])


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


# --------------------------------------------------------------------------- independent references
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def q8_0_reference(w: torch.Tensor) -> torch.Tensor:
    """Quantize and dequantize ``w`` as GGUF's Q8_0 does, in float32 like llama.cpp's reference code."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _round_half_away(blocks * inv)
    return (d.half().float() * codes).reshape(w.shape)


def reference_with(bpe_llama_dir: Path, transform) -> torch.nn.Module:
    """The checkpoint with ``transform`` applied to every matrix (norm vectors stay F32, as in the file)."""
    model = tl_sinks.load_model(bpe_llama_dir, device="cpu")
    with torch.no_grad():
        for p in model.original_model.parameters():
            if p.ndim == 2:
                p.copy_(transform(p))
    return model


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [False, True])
def test_f32_round_trip_equals_the_checkpoint(tied, bpe_llama_dir, tied_llama_dir, reference, tmp_path):
    src = tied_llama_dir if tied else bpe_llama_dir
    path = export_gguf(src, tmp_path / "m.gguf")
    model = tl_sinks.load_model(path, device="cpu")
    ref = reference if not tied else tl_sinks.load_model(src, device="cpu")
    assert not model.training and type(model).__name__ == "TransformerBridge"
    tokens = tokens_for(ref)
    assert torch.equal(tokens_for(model), tokens)
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), rtol=0, atol=1e-5)
    hf = model.original_model
    assert hf.config.tie_word_embeddings is tied
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    # The directory holding only the .gguf loads the same file.
    same = tl_sinks.load_model(tmp_path, device="cpu")
    assert tl_sinks.describe_processing(same)["gguf"]["file"] == str(path)


def test_processing_and_dtype_apply_to_gguf_models(exported, bpe_llama_dir):
    tokens = tokens_for(tl_sinks.load_model(bpe_llama_dir, device="cpu"))
    tl = tl_sinks.load_model(exported["F32"], device="cpu", processing="tl")
    ref = tl_sinks.load_model(bpe_llama_dir, device="cpu", processing="tl")
    assert tl_sinks.describe_processing(tl)["fold_ln"] is True
    torch.testing.assert_close(logits(tl, tokens), logits(ref, tokens), rtol=0, atol=1e-5)
    half = tl_sinks.load_model(exported["F16"], device="cpu", dtype=torch.float16)
    proc = tl_sinks.describe_processing(half)
    assert proc["gguf"]["dequantized_to"] == "float16" and proc["dtype"] == "torch.float16"
    ref = tl_sinks.load_model(bpe_llama_dir, device="cpu", dtype=torch.float16)
    torch.testing.assert_close(logits(half, tokens), logits(ref, tokens), rtol=0, atol=0)  # same fp16 weights


def test_f16_is_the_checkpoint_rounded_to_half(exported, bpe_llama_dir, reference):
    model = tl_sinks.load_model(exported["F16"], device="cpu")
    rounded = reference_with(bpe_llama_dir, lambda w: w.half().float())
    tokens = tokens_for(reference)
    torch.testing.assert_close(logits(model, tokens), logits(rounded, tokens), rtol=0, atol=1e-5)
    # Half precision keeps 11 significant bits (relative step 2**-11 = 4.9e-4). Measured on this model
    # and three other seeds: max |logit diff| 1.1e-2 to 1.6e-2 against the fp32 checkpoint (0.8-1.2%
    # of the logits' std of ~1.4), mean 1.0e-3 to 1.5e-3 (<= 0.11% of the std).
    ref = logits(reference, tokens)
    diff = (logits(model, tokens) - ref).abs()
    assert 0 < diff.max() < 0.03 * ref.std()
    assert diff.mean() < 0.003 * ref.std()


def test_q8_0_weights_and_logits_follow_the_block_quantization(exported, bpe_llama_dir, reference):
    model = tl_sinks.load_model(exported["Q8_0"], device="cpu")
    quantized = reference_with(bpe_llama_dir, q8_0_reference)
    got = dict(model.original_model.named_parameters())
    original = dict(tl_sinks.load_model(bpe_llama_dir, device="cpu").original_model.named_parameters())
    for name, p in quantized.original_model.named_parameters():
        assert torch.equal(got[name], p), name  # transformers undid the q/k row order exactly
        if p.ndim == 2:
            # Each weight is within half a quantization step (block max / 127, + the fp16 rounding
            # of the scale: 127 * 2**-11 of a step at most) of the original.
            blocks, err = original[name].reshape(-1, 32), (p - original[name]).reshape(-1, 32)
            step = blocks.abs().amax(dim=1) / 127
            assert (err.abs().amax(dim=1) <= step * (0.5 + 127 * 2**-11) + 1e-12).all(), name
    tokens = tokens_for(reference)
    torch.testing.assert_close(logits(model, tokens), logits(quantized, tokens), rtol=0, atol=1e-5)
    # Against the float checkpoint, measured on this model and three other seeds (these random,
    # sharpened weights amplify perturbations more than a trained model does): mean |logit diff|
    # 1.9-2.7% of the logits' std (~1.4), max 3.1-9.4% of the largest |logit| (~5-6.5). The bounds
    # are about twice the worst seed.
    ref = logits(reference, tokens)
    diff = (logits(model, tokens) - ref).abs()
    assert diff.max() > 0  # it is quantized
    assert diff.mean() < 0.05 * ref.std()
    assert diff.max() < 0.2 * ref.abs().max()


def test_quantization_counts_are_recorded(exported, bpe_llama_dir):
    # 2 layers x 7 matrices + token_embd + output are matrices; 2 x 2 norms + output_norm are vectors.
    expected = {"F32": {"F32": 21}, "F16": {"F16": 16, "F32": 5}, "Q8_0": {"Q8_0": 16, "F32": 5}}
    for q, path in exported.items():
        model = tl_sinks.load_model(path, device="cpu")
        meta = tl_sinks.describe_processing(model)["gguf"]
        assert meta == {
            "format": "gguf",
            "file": str(path),
            "architecture": "llama",
            "name": bpe_llama_dir.name,
            "quantization": expected[q],
            "dequantized_to": "float32",
        }
        assert tl_sinks.describe_processing(model)["source"] == "gguf"


def test_q8_0_falls_back_to_f16_for_rows_not_in_whole_blocks(tmp_path):
    # hidden 48: every matrix reading the residual (48 columns) cannot be cut into blocks of 32;
    # down_proj reads the 64-wide MLP and can. Norms stay F32.
    src = build_llama(tmp_path / "hf", seed=23, hidden_size=48)
    path = export_gguf(src, tmp_path / "m.gguf", quantization="Q8_0")
    model = tl_sinks.load_model(path, device="cpu")
    assert tl_sinks.describe_processing(model)["gguf"]["quantization"] == {"F16": 14, "F32": 5, "Q8_0": 2}


def test_the_rotary_row_permutation_is_written_and_needed(exported, bpe_llama_dir, reference, tmp_path, monkeypatch):
    # The file stores q/k rows in llama.cpp's order ...
    reader = gguf.GGUFReader(str(exported["F32"]))
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    from transformers import LlamaForCausalLM

    sd = LlamaForCausalLM.from_pretrained(bpe_llama_dir).state_dict()
    q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = sd["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert torch.equal(stored["blk.0.attn_q.weight"], torch.from_numpy(gguf_export.llama_cpp_permute(q, 4)))
    assert torch.equal(stored["blk.1.attn_k.weight"], torch.from_numpy(gguf_export.llama_cpp_permute(k, 2)))
    assert not torch.equal(stored["blk.0.attn_q.weight"], torch.from_numpy(q))
    # ... under the names gguf's own table gives each HF parameter ...
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf_name in sd:
        base, _, suffix = hf_name.rpartition(".")
        assert gguf_export.tensor_name(hf_name) == f"{names.get_name(base)}.{suffix}", hf_name
    assert set(stored) == {gguf_export.tensor_name(n) for n in sd}  # untied: `output` is written
    # ... and without it the round trip breaks (transformers always undoes it).
    monkeypatch.setattr(gguf_export, "llama_cpp_permute", lambda w, n_head: w)
    unpermuted = tl_sinks.load_model(export_gguf(bpe_llama_dir, tmp_path / "plain.gguf"), device="cpu")
    tokens = tokens_for(reference)
    # Measured: max |logit diff| 6.6 to 7.6 over four seeds (with it: 0).
    assert (logits(unpermuted, tokens) - logits(reference, tokens)).abs().max() > 1.0


def test_tokenizer_round_trips_ids(exported, reference):
    model = tl_sinks.load_model(exported["Q8_0"], device="cpu")
    for text in PROBES:
        assert model.tokenizer.encode(text) == reference.tokenizer.encode(text), text
        assert model.to_tokens(text).tolist() == reference.to_tokens(text).tolist(), text
    assert model.tokenizer.bos_token_id == 1 and model.tokenizer.eos_token_id == 2
    assert model.tokenizer.decode(reference.tokenizer.encode(PROBES[3], add_special_tokens=False)) == PROBES[3]


def test_scan_meta_carries_the_gguf_record(exported):
    model = tl_sinks.load_model(exported["Q8_0"], device="cpu")
    result = tl_sinks.scan(model, ["The cat sat on the mat.", "A dog ran in the park."], progress=False)
    assert result.meta["processing"]["gguf"]["quantization"] == {"Q8_0": 16, "F32": 5}


# --------------------------------------------------------------------------- bad input
def one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_without_the_gguf_package(exported, bpe_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(tl_sinks.ModelNotAvailableError) as e:
        tl_sinks.load_model(exported["F32"], device="cpu")
    msg = one_line(e)
    assert str(exported["F32"]) in msg and "pip install 'tl_sinks[gguf]'" in msg
    with pytest.raises(ImportError) as e:
        export_gguf(bpe_llama_dir, tmp_path / "x.gguf")
    assert "pip install 'tl_sinks[gguf]'" in one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the tensor data / in the metadata
def test_truncated_file(keep, exported, tmp_path):
    data = exported["F32"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as e:
        tl_sinks.load_model(path, device="cpu")
    msg = one_line(e)
    assert str(path) in msg and "truncated" in msg


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(b"\x00not gguf at all" * 64)
    with pytest.raises(ModelLoadError) as e:
        tl_sinks.load_model(path, device="cpu")
    assert str(path) in one_line(e) and "not a readable GGUF file" in str(e.value)


def test_unsupported_architecture(tmp_path):
    import numpy as np

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv9")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as e:
        tl_sinks.load_model(path, device="cpu")
    msg = one_line(e)
    assert str(path) in msg and "'rwkv9'" in msg and "llama" in msg and "qwen2" in msg


def test_missing_tensor_is_not_left_random(bpe_llama_dir, tmp_path):
    model, cfg = gguf_export._load_checkpoint(bpe_llama_dir)
    fields = gguf_export._tokenizer_fields(byte_bpe_tokenizer(), cfg["vocab_size"], "t")

    class Without:  # the checkpoint minus one layer's down projection
        def state_dict(self):
            sd = model.state_dict()
            sd.pop("model.layers.1.mlp.down_proj.weight")
            return sd

    path = tmp_path / "holey.gguf"
    gguf_export._write(path, cfg, Without(), fields, "F32", "holey")
    with pytest.raises(ModelLoadError) as e:
        tl_sinks.load_model(path, device="cpu")
    msg = one_line(e)
    assert str(path) in msg and "model.layers.1.mlp.down_proj.weight" in msg


def test_non_finite_weights(bpe_llama_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(bpe_llama_dir)
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    hf.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(bpe_llama_dir).save_pretrained(tmp_path / "hf")
    path = export_gguf(tmp_path / "hf", tmp_path / "nan.gguf")
    with pytest.raises(ModelLoadError) as e:
        tl_sinks.load_model(path, device="cpu")
    assert str(path) in one_line(e) and "NaN" in str(e.value)


def test_missing_gguf_path(tmp_path):
    with pytest.raises(tl_sinks.ModelNotAvailableError, match="does not exist .no such GGUF file."):
        tl_sinks.load_model("model.gguf")
    with pytest.raises(tl_sinks.ModelNotAvailableError, match="no config.json"):
        tl_sinks.load_model(tmp_path)  # an empty directory is no GGUF folder either


def test_directory_with_several_gguf_files(exported):
    with pytest.raises(tl_sinks.ModelNotAvailableError) as e:
        tl_sinks.load_model(exported["F32"].parent, device="cpu")
    assert "3 GGUF files" in one_line(e) and "pass the one to load" in str(e.value)


def test_exporter_refusals(tiny_gpt2_dir, tiny_llama_dir, bpe_llama_dir, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="Llama-architecture"):
        export_gguf(tiny_gpt2_dir, out)
    with pytest.raises(ValueError, match="WordLevel tokenizer .* no GGUF form"):
        export_gguf(tiny_llama_dir, out)  # conftest's word-level tokenizer
    with pytest.raises((ValueError, TypeError), match="quantization"):  # TypeError under beartype
        export_gguf(bpe_llama_dir, out, quantization="Q4_K")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no config.json"):
        export_gguf(tmp_path, out)
    assert list(tmp_path.iterdir()) == []


def test_export_is_atomic(exported, bpe_llama_dir, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise ValueError("tokenizer check failed")

    monkeypatch.setattr(gguf_export, "_verify_tokenizer", broken)
    with pytest.raises(ValueError, match="tokenizer check failed"):
        export_gguf(bpe_llama_dir, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    monkeypatch.undo()
    export_gguf(bpe_llama_dir, path, quantization="Q8_0")
    assert path.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_tokenizer_that_reads_back_differently_is_not_written(bpe_llama_dir, tmp_path, monkeypatch):
    real = gguf_export._tokenizer_fields

    def wrong_merges(*args, **kwargs):
        fields = real(*args, **kwargs)
        return {**fields, "merges": fields["merges"][1:]}  # drop the first merge

    monkeypatch.setattr(gguf_export, "_tokenizer_fields", wrong_merges)
    with pytest.raises(ValueError, match="not writing .* encodes") as e:
        export_gguf(bpe_llama_dir, tmp_path / "m.gguf")
    one_line(e)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_default_model_q8_0_keeps_the_chain(tmp_path):
    """The shipped default model (fp16 weights) exported F32 and Q8_0, scanned on the built-in prompts.

    Measured (CPU): F32 reproduces the checkpoint's scan exactly (its weights are fp16, so F16 does
    too). Q8_0: sink rate 0.6638 -> 0.6626, mean attention to position 0 0.4252 -> 0.4250; the same
    seven super neurons in the same order with the same roles (L0N504 peak 24.155 -> 24.185,
    L2N168 -12.833 -> -12.827); the largest first-token dim stays d81 at layer 5 (13.958 -> 13.957);
    the first/rest value-variance median ratio 0.4234 -> 0.4158. The bounds below are ~10x those
    changes, well inside what would change a finding.
    """
    from tl_sinks.train.default_model import default_model_path

    src = default_model_path()
    models = {
        "base": tl_sinks.load_model("default", device="cpu"),
        "f32": tl_sinks.load_model(export_gguf(src, tmp_path / "f32.gguf"), device="cpu"),
        "q8": tl_sinks.load_model(export_gguf(src, tmp_path / "q8.gguf", quantization="Q8_0"), device="cpu"),
    }
    for text in tl_sinks.builtin_prompts() + PROBES:  # the file's tokenizer gives the checkpoint's ids
        assert models["q8"].tokenizer.encode(text) == models["base"].tokenizer.encode(text), text
    base, f32, q8 = (tl_sinks.scan(m, progress=False) for m in models.values())
    b, f, q = base.summary(), f32.summary(), q8.summary()
    for key in ("sink_rate_pos0", "mean_received_pos0", "top_super_neuron_peak", "massive_dim_value"):
        assert f[key] == pytest.approx(b[key], abs=1e-5), key
    assert q8.meta["processing"]["gguf"]["quantization"] == {"Q8_0": 43, "F32": 13}
    assert abs(q["sink_rate_pos0"] - b["sink_rate_pos0"]) < 0.02
    assert abs(q["mean_received_pos0"] - b["mean_received_pos0"]) < 0.01
    roles = lambda r: list(zip(r.super_neurons.found["label"], r.super_neurons.found["role"]))  # noqa: E731
    assert roles(q8) == roles(base)
    assert q8.super_neurons.chain["label"].tolist() == ["L0N504", "L2N168"]
    assert q["top_super_neuron_peak"] == pytest.approx(b["top_super_neuron_peak"], rel=0.01)
    assert (q["massive_dim_pos0"], q["massive_dim_layer"]) == (b["massive_dim_pos0"], b["massive_dim_layer"])
    assert q["massive_dim_value"] == pytest.approx(b["massive_dim_value"], rel=0.01)
    assert q["var_ratio_first_rest_median"] == pytest.approx(b["var_ratio_first_rest_median"], rel=0.1)
