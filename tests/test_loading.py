"""load_model: local checkpoints, the hub cache, offline errors that come at once, processing."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformer_lens import TransformerBridge
from transformers import AutoModelForCausalLM

import tl_sinks
from tests.conftest import random_prompts
from tl_sinks import loading


@pytest.fixture
def no_boot(monkeypatch):
    """Fail the test if a hub download is even attempted."""

    def boom(*a, **k):
        raise AssertionError("boot_transformers must not be called for an unavailable model")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boom)


def test_local_directory_loads_ready_for_analysis(tiny_llama_dir):
    model = tl_sinks.load_model(tiny_llama_dir, device="cpu")
    assert not model.training
    proc = tl_sinks.describe_processing(model)
    assert proc["source"] == "local" and proc["processing"] == "none"
    assert proc["fold_ln"] is False and proc["compatibility_mode"] is False
    info = tl_sinks.inspect_model(model)
    assert (info.causal, info.post_ln, info.gated_mlp, info.n_key_value_heads) == (True, False, True, 2)
    assert info.additive_resid is True
    assert info.first_token_id == 1


def test_uncached_hub_name_offline_fails_at_once(no_boot, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(tl_sinks.ModelNotAvailableError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        tl_sinks.load_model("gpt2")


def test_uncached_hub_name_with_unreachable_hub_fails_at_once(no_boot, monkeypatch):
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda timeout=3.0: "cannot connect to the hub (test)")
    with pytest.raises(tl_sinks.ModelNotAvailableError, match="unreachable: cannot connect to the hub"):
        tl_sinks.load_model("some-org/some-model")


@pytest.fixture
def endpoint(monkeypatch):
    """Point huggingface_hub at a URL (it reads HF_ENDPOINT once, at import), online for this test."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def point(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return point


def test_hub_probe_needs_an_http_answer(endpoint):
    """An HTTP answer of any status means reachable; a closed port names the endpoint."""
    import http.server
    import socket
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server API
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint(f"http://127.0.0.1:{server.server_port}")
        assert loading._hub_unreachable(timeout=2.0) is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    endpoint(f"http://127.0.0.1:{closed}")
    reason = loading._hub_unreachable(timeout=2.0)
    assert reason is not None and reason.startswith(f"cannot connect to http://127.0.0.1:{closed}")


def test_cached_hub_model_loads_from_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """The code path of `load_model("org/name")`, served from a Hugging Face cache on disk."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tl-sinks-test--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = tl_sinks.load_model("tl-sinks-test/tiny-llama", device="cpu")
    proc = tl_sinks.describe_processing(model)
    assert proc["source"] == "cache" and proc["requested"] == "tl-sinks-test/tiny-llama"
    ref = tl_sinks.load_model(tiny_llama_dir, device="cpu")
    tokens = torch.tensor(random_prompts([6]))
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)


def test_bad_paths_raise(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(tl_sinks.ModelNotAvailableError, match="is a file"):
        tl_sinks.load_model(tmp_path / "weights.bin")
    with pytest.raises(tl_sinks.ModelNotAvailableError, match="no config.json"):
        tl_sinks.load_model(tmp_path)
    with pytest.raises((ValueError, TypeError), match="processing"):  # TypeError under beartype
        tl_sinks.load_model(tmp_path, processing="fold")


def test_minilm_alias_loads_the_packaged_model(minilm_path):
    path, source = loading.resolve_model_path("minilm")
    assert (path, source) == (minilm_path, "package")


def test_minilm_head_is_recorded_as_random_and_its_pooler_as_unused(minilm):
    """MiniLM ships only the encoder (+ pooler): BertForMaskedLM's MLM head stays random."""
    proc = tl_sinks.describe_processing(minilm)
    assert proc["random_head"] == ["cls"] and proc["unused_weights"] == ["pooler"]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_complete_checkpoints_record_no_random_or_unused_parts(fixture, request):
    proc = tl_sinks.describe_processing(request.getfixturevalue(fixture))
    assert proc["random_head"] == [] and proc["unused_weights"] == []


def test_meta_records_the_installed_transformer_lens_version(tiny_llama):
    from importlib.metadata import version

    res = tl_sinks.find_super_neurons_by_weights(tiny_llama)
    assert res.meta["transformer_lens_version"] == version("transformer-lens") != "unknown"
    assert res.meta["transformers_version"] == version("transformers")
    assert res.meta["torch_version"] == torch.__version__


def test_processing_dtype_follows_the_model_after_loading(tiny_llama_dir):
    model = tl_sinks.load_model(tiny_llama_dir, device="cpu")
    assert tl_sinks.describe_processing(model)["dtype"] == "torch.float32"
    model.to(torch.bfloat16)
    assert tl_sinks.describe_processing(model)["dtype"] == "torch.bfloat16"
    res = tl_sinks.find_super_neurons_by_weights(model)
    assert res.meta["processing"]["dtype"] == res.meta["dtype"] == "torch.bfloat16"


@pytest.fixture(scope="module")
def llama_with_norm_gains(planted_llama_dir, tmp_path_factory):
    """The planted model with non-trivial RMSNorm gains, so folding them changes W_in."""
    model = AutoModelForCausalLM.from_pretrained(planted_llama_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
    out = tmp_path_factory.mktemp("gains")
    model.save_pretrained(out)
    shutil.copy(planted_llama_dir / "tokenizer.json", out)
    shutil.copy(planted_llama_dir / "tokenizer_config.json", out)
    return out


def test_weight_processing_is_recorded_and_changes_weight_scores_only(llama_with_norm_gains):
    raw = tl_sinks.load_model(llama_with_norm_gains, device="cpu")
    tl = tl_sinks.load_model(llama_with_norm_gains, device="cpu", processing="tl")
    assert tl_sinks.describe_processing(tl)["fold_ln"] is True
    assert tl_sinks.describe_processing(raw)["fold_ln"] is False
    w_raw = tl_sinks.find_super_neurons_by_weights(raw)
    w_tl = tl_sinks.find_super_neurons_by_weights(tl)
    assert w_raw.meta["processing"]["fold_ln"] is False and w_tl.meta["processing"]["fold_ln"] is True
    # Folding multiplies each W_in row (input dim) by the norm gain: column norms change.
    gain = raw.original_model.model.layers[0].post_attention_layernorm.weight.detach()
    expected = (raw.blocks[0].mlp.W_in.detach() * gain[:, None]).norm(dim=0)
    torch.testing.assert_close(w_tl.up_norm[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_tl.up_norm, w_raw.up_norm, rtol=1e-3)
    # The activation-based finder reads hook_post, which folding leaves unchanged.
    prompts = random_prompts([12] * 4, seed=3, low=10)
    a_raw = tl_sinks.find_super_neurons(raw, prompts)
    a_tl = tl_sinks.find_super_neurons(tl, prompts)
    torch.testing.assert_close(a_tl.max_abs, a_raw.max_abs, rtol=1e-4, atol=1e-4)
    assert a_tl.found["label"].tolist() == a_raw.found["label"].tolist() == ["L1N7"]
