"""The training harness runs on CPU, is seeded and resumes bit for bit, and its checkpoints load
through load_model like any Hugging Face model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tl_sinks
from tl_sinks.train import TrainConfig, build_corpus, lr_at, train

TINY = dict(
    d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=320, seq_len=32, steps=6, batch_size=4,
    warmup=2, packages=(), max_documents=150, eval_every=3, eval_batches=2, checkpoint_every=3, num_threads=1,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(**TINY), out, progress=False)
    return out


def test_training_writes_a_loadable_hf_model(run_dir):
    model_dir = run_dir / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    meta = json.loads((model_dir / "training.json").read_text())
    assert meta["steps"] == 6 and meta["tokens_seen"] == 6 * 4 * 32
    assert meta["corpus"]["documents"] == 150 and len(meta["corpus"]["sha256"]) == 64
    log = json.loads((run_dir / "log.json").read_text())
    assert [s for s, _ in log["train"]] == list(range(1, 7)) and [s for s, _ in log["val"]] == [3, 6]
    model = tl_sinks.load_model(model_dir, device="cpu")
    info = tl_sinks.inspect_model(model)
    assert info.architecture == "LlamaForCausalLM" and info.first_token_id == model.tokenizer.bos_token_id
    r = tl_sinks.scan(model, ["def f(x): return x", "Return the sum of the values."], progress=False)
    assert r.meta["pos0_is_bos"] is True


def test_every_training_sequence_starts_with_bos(run_dir):
    from tl_sinks.train.trainer import prepare_data, sample_batch

    data = prepare_data(TrainConfig(**TINY), run_dir / "data", progress=False)
    x = sample_batch(data["train"], 8, 32, data["tokenizer"].bos_token_id, torch.Generator().manual_seed(0))
    assert (x[:, 0] == data["tokenizer"].bos_token_id).all()
    assert not (x[:, 1:] == data["tokenizer"].bos_token_id).any()


def test_bos_prob_mixes_windows_without_bos(run_dir):
    from tl_sinks.train.trainer import prepare_data, sample_batch

    data = prepare_data(TrainConfig(**TINY), run_dir / "data", progress=False)
    ids, bos = np.asarray(data["train"]), data["tokenizer"].bos_token_id
    x = sample_batch(ids, 64, 32, bos, torch.Generator().manual_seed(0), bos_prob=0.5)
    has = x[:, 0] == bos
    assert 10 < int(has.sum()) < 54 and not (x[:, 1:] == bos).any()
    for row, b in zip(x, has):  # every row is one contiguous window of the token stream
        body = row[1:] if b else row
        starts = np.flatnonzero(ids[: len(ids) - len(body) + 1] == int(body[0]))
        assert any((ids[s : s + len(body)] == body.numpy()).all() for s in starts)
    assert not (sample_batch(ids, 16, 32, bos, torch.Generator().manual_seed(0), bos_prob=0.0)[:, 0] == bos).any()
    # The default draws exactly what it drew before the option existed (seeded runs unchanged).
    torch.testing.assert_close(sample_batch(ids, 8, 32, bos, torch.Generator().manual_seed(3)),
                               sample_batch(ids, 8, 32, bos, torch.Generator().manual_seed(3), bos_prob=1.0), rtol=0, atol=0)
    assert "bos_prob" not in TrainConfig(**TINY).to_dict()  # older runs' configs still compare equal
    assert TrainConfig(**(TINY | {"bos_prob": 0.5})).to_dict()["bos_prob"] == 0.5
    with pytest.raises(ValueError, match="bos_prob"):
        TrainConfig(**(TINY | {"bos_prob": 1.5}))
    with pytest.raises(ValueError, match="without BOS"):
        sample_batch(ids[:32], 4, 32, bos, torch.Generator().manual_seed(0), bos_prob=0.5)


def test_resume_is_bit_exact_and_runs_are_seeded(run_dir, tmp_path):
    split = tmp_path / "split"
    train(TrainConfig(**TINY), split, progress=False, stop_after=3)
    assert not (split / "model").exists()
    train(TrainConfig(**TINY), split, progress=False)
    a = load_file(str(run_dir / "model" / "model.safetensors"))
    b = load_file(str(split / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    other = tmp_path / "seed1"
    train(TrainConfig(**(TINY | {"seed": 1})), other, progress=False)
    c = load_file(str(other / "model" / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_resume_refuses_a_different_config(run_dir):
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig(**(TINY | {"steps": 8})), run_dir, progress=False)


@pytest.mark.parametrize("variant", ["headnorm", "gated", "sink_logit", "softmax1"])
def test_every_variant_trains_and_loads(tmp_path, variant):
    out = train(TrainConfig(**(TINY | {"attention": variant, "steps": 2, "eval_every": 2, "checkpoint_every": 2})), tmp_path, progress=False)
    model = tl_sinks.load_model(out, device="cpu")
    assert json.loads((out / "config.json").read_text())["tl_sinks_attention"] == variant
    r = tl_sinks.scan(model, ["Return the value.", "def f(): pass"], progress=False, stages=["sinks"])
    assert r.sinks.values.shape[0] == 2


def test_lr_schedule():
    cfg = TrainConfig(**(TINY | {"steps": 100, "warmup": 10, "lr": 1e-3, "min_lr_ratio": 0.1}))
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 55) == pytest.approx(1e-4 + 0.9e-3 * 0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown attention variant"):
        TrainConfig(attention="linear")
    cfg = TrainConfig(**TINY)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_corpus_is_deterministic_and_split_by_hash():
    a = build_corpus(packages=(), max_documents=40)
    b = build_corpus(packages=(), max_documents=40)
    assert a.documents == b.documents and a.manifest["sha256"] == b.manifest["sha256"]
    train_docs, val_docs = a.split(0.2)
    assert sorted(train_docs + val_docs) == sorted(a.documents) and 0 < len(val_docs) < 40


def test_bf16_autocast_trains_deterministically_and_differs_from_fp32(run_dir, tmp_path):
    cfg = TrainConfig(**TINY | {"autocast": "bfloat16"})
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # seeded: same run, same weights
    assert all(v.dtype == torch.float32 for v in wa.values())  # master weights stay fp32
    ref = load_file(str(run_dir / "model" / "model.safetensors"))
    # The same seed in fp32 gives different weights: the forward really ran in bf16.
    assert any(not torch.equal(wa[k], ref[k]) for k in wa)
    log = json.loads((tmp_path / "a" / "log.json").read_text())
    assert log["config"]["autocast"] == "bfloat16" and all(map(torch.isfinite, torch.tensor([v for _, v in log["train"]])))
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(**TINY | {"autocast": "int8"})
