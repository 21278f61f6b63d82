"""load_model on broken, inconsistent or hostile inputs: one-line errors naming the file, in bounded time.

Each broken checkpoint is a copy of a tiny fixture model with one thing wrong. Without the checks
in ``tl_sinks.loading`` these either load silently wrong (a config that declares more or fewer
layers than are stored), raise a raw multi-line traceback, or hang (a hub that never answers).
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_sinks
from tl_sinks import loading
from tl_sinks.errors import ModelLoadError


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_config(model_dir: Path, **changes) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def drop_tensors(model_dir: Path, keep) -> None:
    """Rewrite model.safetensors keeping only the tensors whose name ``keep`` accepts."""
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if keep(k)}, str(path), metadata={"format": "pt"})


def load_error(path, exc=ModelLoadError) -> str:
    """The message load_model raises for ``path``, checked to be a single line."""
    with pytest.raises(exc) as info:
        tl_sinks.load_model(path, device="cpu")
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- config vs weights
def test_config_declaring_more_layers_than_stored_raises(tiny_llama_dir, tmp_path):
    """Without the check, layers 2-3 would be randomly initialised and analysed silently."""
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    edit_config(bad, num_hidden_layers=4)
    msg = load_error(bad)
    assert msg.startswith(f"{bad / 'config.json'} does not match the weights in {bad / 'model.safetensors'}")
    assert "config.json declares 4 layers, the weights hold 2" in msg
    assert "missing from the weights" in msg and "model.layers.2." in msg


def test_config_declaring_fewer_layers_than_stored_raises(tiny_llama_dir, tmp_path):
    """Without the check, the stored layer 1 would be dropped silently."""
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    edit_config(bad, num_hidden_layers=1)
    msg = load_error(bad)
    assert "config.json declares 1 layer, the weights hold 2" in msg
    assert "in the weights but not in the model" in msg and "model.layers.1." in msg


def test_missing_embedding_raises(tiny_gpt2_dir, tmp_path):
    bad = copy_model(tiny_gpt2_dir, tmp_path / "m")
    drop_tensors(bad, lambda k: "wte" not in k)
    assert "transformer.wte.weight" in load_error(bad)


def test_tensor_shapes_that_differ_from_the_config_raise(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    edit_config(bad, intermediate_size=48)
    msg = load_error(bad)
    assert "tensor shapes differ" in msg and "weights [64, 32], config [48, 32]" in msg


def test_partly_missing_head_raises(tiny_bert_dir, tmp_path):
    bad = copy_model(tiny_bert_dir, tmp_path / "m")
    drop_tensors(bad, lambda k: k != "cls.predictions.transform.dense.weight")
    assert "cls.predictions.transform.dense.weight" in load_error(bad)


def test_wholly_missing_head_is_allowed_and_recorded(tiny_bert_dir, tmp_path):
    """A bare-encoder checkpoint (as MiniLM ships) loads; its random MLM head is recorded."""
    enc = copy_model(tiny_bert_dir, tmp_path / "m")
    drop_tensors(enc, lambda k: not k.startswith("cls."))
    proc = tl_sinks.describe_processing(tl_sinks.load_model(enc, device="cpu"))
    assert proc["random_head"] == ["cls"] and proc["unused_weights"] == []


def test_pretraining_checkpoint_loads_with_its_other_heads_unused(tiny_bert_dir, tmp_path):
    """bert-base-uncased ships BertForPreTraining weights: the NSP head and the pooler, which
    BertForMaskedLM does not build, are ignored and recorded, not an error."""
    from transformers import BertConfig, BertForPreTraining

    out = tmp_path / "m"
    BertForPreTraining(BertConfig.from_pretrained(tiny_bert_dir)).save_pretrained(out)
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, out)
    proc = tl_sinks.describe_processing(tl_sinks.load_model(out, device="cpu"))
    assert proc["random_head"] == [] and proc["unused_weights"] == ["cls.seq_relationship", "pooler"]


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = copy_model(tiny_llama_dir, tmp_path / "m")
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="10KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    ref = tl_sinks.load_model(tiny_llama_dir, device="cpu")
    model = tl_sinks.load_model(sharded, device="cpu")
    tokens = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)
    shards[-1].unlink()
    msg = load_error(sharded)
    assert str(sharded / "model.safetensors.index.json") in msg and shards[-1].name in msg


def pickled_bin(model_dir: Path) -> None:
    """Replace the safetensors weights with a pytorch_model.bin holding the same tensors."""
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")


def test_bin_checkpoint_with_a_mismatched_config_raises(tiny_llama_dir, tmp_path):
    good = copy_model(tiny_llama_dir, tmp_path / "good")
    pickled_bin(good)
    tl_sinks.load_model(good, device="cpu")
    bad = copy_model(good, tmp_path / "bad")
    edit_config(bad, num_hidden_layers=4)
    msg = load_error(bad)
    assert str(bad / "pytorch_model.bin") in msg and "model.layers.2." in msg


class _Touch:
    """A pickle that creates a file when unpickled: what a hostile .bin can do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_hostile_pickle_is_refused_not_run(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Touch(marker)}, f, protocol=2)
    msg = load_error(bad)
    assert str(bad / "pytorch_model.bin") in msg and "weights_only=True" in msg
    assert not marker.exists()


# --------------------------------------------------------------------------- broken files
def test_config_without_weights_names_what_was_looked_for(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    (bad / "model.safetensors").unlink()
    msg = load_error(bad)
    assert msg.startswith(f"{bad} has a config.json but no weights") and "model.safetensors" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_safetensors_names_the_file(tiny_llama_dir, tmp_path, damage):
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 100)
    assert load_error(bad).startswith(f"{path} is not a readable safetensors file")


def test_invalid_config_json_names_the_file(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    (bad / "config.json").write_text('{"model_type": "llama",')
    msg = load_error(bad)
    assert msg.startswith(f"{bad / 'config.json'} is not valid JSON (line 1")


def test_missing_tokenizer_says_so(tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / name).unlink(missing_ok=True)
    msg = load_error(bad)
    assert msg.startswith(f"{bad} has no tokenizer files (looked for tokenizer.json")
    assert "sentencepiece" not in msg


@pytest.mark.parametrize("kind", ["absolute", "relative", "pathlike"])
def test_path_that_does_not_exist_says_so(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    path = {"absolute": str(tmp_path / "nope" / "model"), "relative": "./nope", "pathlike": Path("nope")}[kind]
    msg = load_error(path, tl_sinks.ModelNotAvailableError)
    assert msg == f"{path} does not exist (no such model directory)"


# --------------------------------------------------------------------------- shipped default weights
def test_shipped_default_weights_match_the_recorded_digest():
    import hashlib

    path = Path(loading._default_path()) / "model.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == loading.DEFAULT_WEIGHTS_SHA256


def test_tampered_default_weights_raise(tmp_path, monkeypatch):
    copy = copy_model(Path(loading._default_path()), tmp_path / "default")
    monkeypatch.setitem(loading.OFFLINE_ALIASES, "default", lambda: str(copy))
    tl_sinks.load_model("default", device="cpu")  # an intact copy loads
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: the file is still valid safetensors
    path.write_bytes(bytes(data))
    msg = load_error("default")
    assert msg.startswith(f"{path} has SHA-256") and "reinstall tl_sinks" in msg


# --------------------------------------------------------------------------- a hub that never answers
@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """A loopback TCP server that accepts connections and never answers, set as the hub.

    Only for this test: HF_HUB_OFFLINE is unset, and huggingface_hub / transformers constants
    read at import are pointed at it; the cache is an empty temporary folder.
    """
    import transformers.utils.hub as tf_hub
    from huggingface_hub import constants, hf_api

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(tf_hub, "_hf_api", None)
    yield url
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def run_bounded(fn, seconds: float) -> tuple[BaseException | None, float]:
    """Run ``fn`` in a daemon thread; fail the test (instead of hanging) if it takes longer."""
    out: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    start = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: the hub call is unbounded"
    return out.get("error"), time.monotonic() - start


def test_silent_hub_fails_within_seconds(silent_hub):
    error, took = run_bounded(lambda: tl_sinks.load_model("some-org/some-model", device="cpu"), 20)
    assert isinstance(error, tl_sinks.ModelNotAvailableError), error
    assert f"{silent_hub} accepted the connection but sent no answer within 3 s" in str(error)
    assert "\n" not in str(error) and took < 10


def test_hub_calls_past_the_probe_are_bounded(silent_hub, monkeypatch):
    """Were the probe fooled (a hub that answers it, then stalls), every request is still bounded:
    huggingface_hub sends model_info with no timeout at all, and retries a file missing from the
    cache with a 60 s timeout five times."""
    from huggingface_hub import constants

    monkeypatch.setattr(loading, "_hub_unreachable", lambda timeout=3.0: None)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    error, took = run_bounded(lambda: tl_sinks.load_model("some-org/some-model", device="cpu"), 30)
    assert isinstance(error, tl_sinks.ModelNotAvailableError), error
    msg = str(error)
    assert msg.startswith(f"could not download 'some-org/some-model' from {silent_hub}: a request to {silent_hub}/")
    assert "got no answer" in msg and "\n" not in msg and took < 15
