"""The issue-16 harness (benchmarks/convergence_default.py) on a tiny recipe: its curves equal an
independent scan of its snapshots, a split run equals an uninterrupted one, earlier runs are
merged, and verdicts stay "undetermined" until the evidence is there; the trainer's on_eval hook
and its emulated-bf16 warning."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tl_sinks
from tl_sinks.train import TrainConfig, train
from tl_sinks.train import trainer as trainer_mod

ROOT = Path(__file__).resolve().parents[1]
TINY = TrainConfig(
    d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=320, seq_len=32, steps=20, batch_size=4, warmup=2,
    packages=(), max_documents=150, eval_every=10, eval_batches=2, checkpoint_every=10,
)


def _load_script():
    spec = importlib.util.spec_from_file_location("convergence_default", ROOT / "benchmarks" / "convergence_default.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


cd = _load_script()


def _plan(tmp: Path, **kw):
    kw = {"variants": ["softmax"], "seeds": [0], "measure_every": 10, "autocast": "none", "threads": 1,
          "measure_prompts": 4, "out": tmp / "runs", "json_path": tmp / "results" / "study.json", "base": TINY,
          "command": "python benchmarks/convergence_default.py (test)"} | kw
    return cd.Plan(**kw)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Uninterrupted tiny runs (softmax and headnorm, seed 0), reported."""
    tmp = tmp_path_factory.mktemp("study")
    plan = _plan(tmp, variants=["softmax", "headnorm"])
    cd.run_all(plan)
    report = cd.build_report(plan, cd.collect_runs(plan))
    cd.write_outputs(plan, report)
    return plan, report


def test_report_schema_and_outputs(study):
    plan, report = study
    doc = json.loads(plan.json_path.read_text())
    assert {"runs", "command", "recipe", "machine", "paper", "summary", "verdicts", "status"} <= set(doc)
    assert doc["command"] == plan.command and doc["paper"]["val_loss"] == {"softmax": 2.7812, "headnorm": 2.7421}
    assert {"platform", "torch", "threads", "cpu_bf16_native"} <= set(doc["machine"])
    assert [(r["variant"], r["seed"]) for r in doc["runs"]] == [("headnorm", 0), ("softmax", 0)]
    run = doc["runs"][1]
    assert {"variant", "seed", "steps", "steps_planned", "complete", "autocast", "seconds", "final_val_loss", "sink_rate",
            "disparity_pos0", "var_ratio_first_rest", "curve"} <= set(run)
    assert (run["variant"], run["seed"], run["steps"], run["steps_planned"], run["complete"]) == ("softmax", 0, 20, 20, True)
    assert run["autocast"] is None and run["seconds"] > 0
    assert all([p["step"] for p in r["curve"]] == [10, 20] for r in doc["runs"])
    for p in doc["runs"][0]["curve"] + run["curve"]:
        assert set(p) == {"step", "val_loss", "sink_rate", "mean_received_pos0", "disparity_pos0", "var_ratio_first_rest",
                          "top_super_neuron"}
        assert p["top_super_neuron"] is None or set(p["top_super_neuron"]) == {"name", "layer", "neuron", "peak", "pos"}
    assert run["final_val_loss"] == run["curve"][-1]["val_loss"]
    # One seed per variant: nothing can be concluded.
    assert [v["id"] for v in doc["verdicts"]] == list("abcde")
    assert all(v["verdict"] == "undetermined" and "complete seeds" in v["reason"] for v in doc["verdicts"])
    assert plan.json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "undetermined" in plan.json_path.with_suffix(".md").read_text()


def _softmax_run(report):
    (run,) = [r for r in report["runs"] if r["variant"] == "softmax"]
    return run


@pytest.mark.parametrize("variant", ["softmax", "headnorm"])
def test_curve_equals_an_independent_scan_of_the_snapshots(study, variant):
    plan, report = study
    (run,) = [r for r in report["runs"] if r["variant"] == variant]
    run_dir = cd.run_dir(plan, cd.run_config(plan, variant, 0, None))
    log = json.loads((run_dir / "log.json").read_text())
    assert [[p["step"], p["val_loss"]] for p in run["curve"]] == log["val"]
    from tl_sinks.train.trainer import prepare_data, sample_batch

    data = prepare_data(TINY, plan.out / "data", progress=False)
    gen = torch.Generator().manual_seed(123)  # the card's windows, cut to the tiny model's 32 tokens
    prompts = sample_batch(data["val"][:20000], 64, 32, data["tokenizer"].bos_token_id, gen)[:4]
    for p in run["curve"]:
        model = tl_sinks.load_model(run_dir / "snapshots" / f"step_{p['step']:05d}", device="cpu")
        r = tl_sinks.scan(model, prompts, progress=False)
        assert p["sink_rate"] == pytest.approx(r.sinks.sink_rate(0), abs=1e-6)
        assert p["mean_received_pos0"] == pytest.approx(r.sinks.mean_received(0), rel=1e-5)
        assert p["disparity_pos0"] == pytest.approx(r.disparity.disparity(0), rel=1e-5)
        assert p["var_ratio_first_rest"] == pytest.approx(float(r.aggregation.first_rest_ratio().values.median()), rel=1e-5)
        found = r.super_neurons.found
        if found.empty:
            assert p["top_super_neuron"] is None
        else:
            row = (r.super_neurons.chain if len(r.super_neurons.chain) else found).iloc[0]
            assert p["top_super_neuron"]["name"] == row["label"] and p["top_super_neuron"]["pos"] == int(row["max_pos"])


def test_split_run_equals_uninterrupted_and_is_never_remeasured(study, tmp_path, monkeypatch):
    plan_full, report = study
    plan = _plan(tmp_path, stop_after=10)
    cd.run_all(plan)
    partial = cd.build_report(plan, cd.collect_runs(plan))
    (run,) = partial["runs"]
    assert (run["steps"], run["complete"], [p["step"] for p in run["curve"]]) == (10, False, [10])
    assert partial["summary"]["softmax"]["n"] == 0 and partial["status"].startswith("INCOMPLETE")
    assert all(v["verdict"] == "undetermined" for v in partial["verdicts"])
    measured = []
    real = cd.measure_snapshot
    monkeypatch.setattr(cd, "measure_snapshot", lambda *a: measured.append(a[0].name) or real(*a))
    cd.run_all(dataclasses.replace(plan, stop_after=None))
    assert measured == ["step_00020"]  # step 10 kept from the first sitting
    (done,) = cd.collect_runs(plan)
    assert done["curve"] == _softmax_run(report)["curve"] and done["final_val_loss"] == _softmax_run(report)["final_val_loss"]
    assert len(done["sittings"]) == 2 and done["seconds"] == sum(x["seconds"] for x in done["sittings"]) > 0
    # A recorder never measures a step its curve already holds (e.g. after a crash before the checkpoint).
    cfg = cd.run_config(plan, "softmax", 0, None)
    rec = cd.CurveRecorder(cd.run_dir(plan, cfg), cfg, None, None, 10)
    rec(10, None, 0.0)
    assert measured == ["step_00020"] and not rec.wants(10) and not rec.wants(20) and rec.wants(30)


def test_merge_keeps_runs_of_earlier_invocations(study, tmp_path):
    plan, report = study
    json_path = tmp_path / "study.json"
    json_path.write_text(plan.json_path.read_text())
    other = _plan(tmp_path, out=tmp_path / "elsewhere", json_path=json_path)
    planted = dict(_softmax_run(report), seed=7, config_hash="planted")
    doc = json.loads(json_path.read_text())
    json_path.write_text(json.dumps(doc | {"runs": doc["runs"] + [planted]}))
    runs = cd.collect_runs(other)
    assert [(r["variant"], r["seed"], r["config_hash"]) for r in runs] == [
        (r["variant"], 0, r["config_hash"]) for r in report["runs"]] + [("softmax", 7, "planted")]
    # Seed 7 is not in this plan: it is kept but not summarised.
    summary = cd.build_report(dataclasses.replace(other, variants=["softmax", "headnorm"]), runs)["summary"]
    assert summary["softmax"]["n"] == 1 and summary["headnorm"]["n"] == 1


def _run(variant, seed, final, sink, disp, var, reach_at=None, complete=True, steps=100):
    curve = [{"step": 50, "val_loss": 9.0 if reach_at != 50 else final}, {"step": 100, "val_loss": final}]
    return {"variant": variant, "seed": seed, "complete": complete, "final_val_loss": final, "sink_rate": sink,
            "disparity_pos0": disp, "var_ratio_first_rest": var, "curve": curve, "steps": steps}


def test_summary_statistics_are_mean_and_pstdev_over_complete_runs():
    runs = [_run("softmax", s, f, 0.3, d, 2.0) for s, f, d in ((0, 3.0, 10.0), (1, 3.2, 14.0), (2, 3.1, 11.0))]
    runs.append(_run("softmax", 3, 1.0, 0.9, 99.0, 5.0, complete=False))
    s = cd.summarize(runs, ["softmax"])
    assert s["softmax"]["n"] == 3 and s["softmax"]["seeds"] == [0, 1, 2]
    assert s["softmax"]["final_val_mean"] == statistics.mean([3.0, 3.2, 3.1])
    assert s["softmax"]["final_val_std"] == statistics.pstdev([3.0, 3.2, 3.1])
    assert s["softmax"]["disparity_std"] == statistics.pstdev([10.0, 14.0, 11.0])
    assert s["baseline_final_val_mean"] == statistics.mean([3.0, 3.2, 3.1])
    # Reaching the baseline's mean final loss (3.1): seeds 0 and 2 at step 100, seed 1 never.
    assert s["softmax"]["steps_to_baseline_final"] == [100, None, 100]


def _verdicts(head, base=None):
    # Equal final losses, so every baseline seed reaches the mean at its last step.
    base = base or [_run("softmax", s, 3.0, 0.4 + 0.01 * s, 50.0 + s, 3.0 + 0.1 * s) for s in range(3)]
    s = cd.summarize(base + head, ["softmax", "headnorm"])
    return {v["id"]: v for v in cd.verdicts(s, 100)}


def test_verdict_branches():
    better = [_run("headnorm", s, 2.9, 0.01, 20.0 + s, 1.1, reach_at=50) for s in range(3)]
    assert {k: v["verdict"] for k, v in _verdicts(better).items()} == dict.fromkeys("abcde", "holds")
    worse = [_run("headnorm", s, 3.5, 0.9, 90.0, 10.0) for s in range(3)]  # never reaches the baseline's loss
    assert {k: v["verdict"] for k, v in _verdicts(worse).items()} == dict.fromkeys("abcde", "does not hold")
    mixed = [_run("headnorm", s, (2.9, 3.01, 3.5)[s], 0.405, 51.0, (1 / 3.05, 3.05, 2.0)[s]) for s in range(3)]
    v = _verdicts(mixed)
    assert all(v[k]["verdict"] == "undetermined" and "overlap" in v[k]["reason"] for k in "acde")
    assert v["a"]["paper"] == {"softmax": 2.7812, "headnorm": 2.7421} and v["c"]["paper"]["headnorm"] == 33.74
    # (e) is judged on |log ratio|: a ratio of 1/3.05 is as far from parity as 3.05.
    assert v["e"]["ours"]["headnorm"]["mean"] == pytest.approx(statistics.mean([1 / 3.05, 3.05, 2.0]))
    assert math.isclose(abs(math.log(1 / 3.05)), math.log(3.05))


def test_verdicts_undetermined_without_enough_seeds_or_without_a_sink():
    better = [_run("headnorm", s, 2.9, 0.01, 20.0, 1.1, reach_at=50) for s in range(3)]
    two = _verdicts(better[:2])
    assert all(v["verdict"] == "undetermined" and "headnorm has 2" in v["reason"] for v in two.values())
    incomplete = _verdicts(better[:2] + [dict(better[2], complete=False)])
    assert all(v["verdict"] == "undetermined" for v in incomplete.values())
    no_sink = [_run("softmax", s, 3.0, 0.01, 50.0, 3.0) for s in range(3)]
    v = _verdicts(better, base=no_sink)
    assert all(x["verdict"] == "undetermined" and "no sink" in x["reason"] for x in v.values())


def test_same_seed_same_data_order_and_on_eval_before_checkpoint(tmp_path, monkeypatch):
    plan = _plan(tmp_path, measure_every=3, base=dataclasses.replace(TINY, eval_every=3, checkpoint_every=3))
    batches: list[torch.Tensor] = []
    real = trainer_mod.sample_batch

    def record(*a, **k):
        batches.append(real(*a, **k))  # training batches, then the validation ones
        return batches[-1]

    monkeypatch.setattr(trainer_mod, "sample_batch", record)
    seen = {}
    for variant, seed in (("softmax", 0), ("headnorm", 0), ("softmax", 1)):
        cfg = dataclasses.replace(cd.run_config(plan, variant, seed, None), steps=3)
        run = tmp_path / f"{variant}{seed}"
        before = len(batches)
        calls = []
        train(cfg, run, progress=False, on_eval=lambda step, model, loss: calls.append(
            (step, model.training, loss, (run / "checkpoint.pt").exists())))
        seen[(variant, seed)] = batches[before:]
        log = json.loads((run / "log.json").read_text())
        assert calls == [(3, True, log["val"][0][1], False)]  # after validation, before its checkpoint
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert state["config"] == cfg.to_dict() and set(state) == set(trainer_mod._CHECKPOINT_KEYS) | {"python_rng", "numpy_rng"}
    assert len(seen[("softmax", 0)]) == 3 + TINY.eval_batches
    for a, b in zip(seen[("softmax", 0)], seen[("headnorm", 0)]):
        assert torch.equal(a, b)
    assert not torch.equal(seen[("softmax", 0)][0], seen[("softmax", 1)][0])


@pytest.mark.parametrize("native", [False, True, None])
def test_emulated_bf16_warning(native, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: native)
    cfg = dataclasses.replace(TINY, steps=1, eval_every=1, checkpoint_every=1, autocast="bfloat16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, tmp_path, progress=False)
    ours = [w for w in caught if "emulated" in str(w.message)]
    if native is False:
        (w,) = ours
        assert "\n" not in str(w.message) and "autocast=None" in str(w.message) and "17.5 s/step" in str(w.message)
    else:
        assert not ours


def test_cpu_bf16_detection_and_autocast_choice(monkeypatch):
    assert trainer_mod.cpu_has_native_bf16() in (True, False, None)
    assert cd.resolve_autocast("none", "cpu") is None and cd.resolve_autocast("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: True)
    assert cd.resolve_autocast("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda: False)
    assert cd.resolve_autocast("auto", "cpu") is None


def test_command_line_defaults_and_reproducing_command():
    from tl_sinks.train.default_model import RECIPE

    plan, report_only = cd.parse_args(["--stop-after", "4000", "--seeds", "0", "1"])
    assert (plan.steps, plan.measure_every, plan.variants, plan.seeds, plan.stop_after) == (8000, 500, ["softmax", "headnorm"], [0, 1], 4000)
    assert plan.base is RECIPE and plan.out == Path("runs/convergence_default") and not report_only
    assert plan.command == "python benchmarks/convergence_default.py --seeds 0 1"
    cfg = cd.run_config(plan, "headnorm", 2, None)
    assert dataclasses.replace(cfg, attention="softmax", seed=0, autocast="bfloat16") == RECIPE
    with pytest.raises(ValueError, match="multiple"):
        cd.parse_args(["--measure-every", "250"])


def test_top_super_neuron_prefers_the_chain_then_the_largest_write_norm():
    from types import SimpleNamespace

    import pandas as pd

    rows = pd.DataFrame({"label": ["L1N5", "L2N7"], "layer": [1, 2], "neuron": [5, 7], "max_value": [40.0, -9.5],
                         "max_pos": [0, 3], "role": ["first_token", "chain"]})
    r = SimpleNamespace(super_neurons=SimpleNamespace(found=rows, chain=rows[rows["role"] == "chain"]))
    assert cd.top_super_neuron(r) == {"name": "L2N7", "layer": 2, "neuron": 7, "peak": -9.5, "pos": 3}
    r.super_neurons.chain = rows.iloc[:0]
    assert cd.top_super_neuron(r)["name"] == "L1N5"
    r.super_neurons.found = rows.iloc[:0]
    assert cd.top_super_neuron(r) is None
