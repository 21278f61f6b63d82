"""Issue 14: TransformerLens habits of the result objects and stage entry points.

* compact ``repr`` for every result class (no tensor printed, bounded length);
* ``result.save(path)`` / ``ResultClass.load(path)`` / ``tl_sinks.load_result(path)``: one
  safetensors file, no pickle, exact round trip, one-line errors naming the file;
* stages fed a precomputed ``ActivationCache`` (``cache=``) give the forward pass's numbers;
* one intervention spec where a list is expected; progress-bar defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

import tl_sinks
from tests.conftest import random_prompts
from tl_sinks.aggregation import ValueAggregation
from tl_sinks.interventions import AblateNeurons, ScaleOutput, SelfOnlyMask, intervene, intervention_hooks
from tl_sinks.patching import PatchingResult, logit_diff_metric, patch_sweep
from tl_sinks.results import ResultFileError, SinkResult, load_result
from tl_sinks.sinks import SinkScores

STAGE_FNS = {
    "sinks": tl_sinks.compute_sink_scores,
    "aggregation": tl_sinks.compute_value_aggregation,
    "super_neurons": tl_sinks.find_super_neurons,
    "disparity": tl_sinks.compute_dimension_disparity,
}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def default_model():
    return tl_sinks.load_model()


@pytest.fixture(scope="module")
def default_scan(default_model):
    return tl_sinks.scan(default_model, tl_sinks.builtin_prompts()[:12], progress=False)


@pytest.fixture(scope="module")
def tiny_scan(tiny_llama):
    return tl_sinks.scan(tiny_llama, random_prompts([7, 5, 9]), progress=False)


@pytest.fixture(scope="module")
def patching_result(tiny_llama):
    clean = torch.tensor(random_prompts([7, 7, 7], seed=20))
    corrupted = clean.clone()
    corrupted[:, 3] = torch.tensor([40, 41, 42])
    metric = logit_diff_metric(torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22]))
    return patch_sweep(tiny_llama, corrupted, clean, metric, site="z", progress=False)


def right_padded(model, texts):
    """Texts tokenised one by one (BOS prepended), right-padded: ``(tokens, attention_mask)``."""
    seqs = [model.to_tokens(s, prepend_bos=True, move_to_device=False)[0] for s in texts]
    n = max(len(s) for s in seqs)
    tokens = torch.zeros((len(seqs), n), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return tokens, mask


# --------------------------------------------------------------------------- equality helpers
def assert_same(a, b, where="result"):
    """Recursive exact equality: tensors (values and dtype), DataFrames (dtypes too), results, NaN == NaN."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), where
        assert torch.equal(torch.isnan(a), torch.isnan(b)) if a.is_floating_point() else True, where
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_one_line_error(excinfo, path, *needles):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# --------------------------------------------------------------------------- 1. repr
def test_scan_result_repr_is_compact_and_informative(default_scan):
    text = repr(default_scan)
    assert len(text) < 2000, len(text)
    assert "tensor(" not in text and "DataFrame(" not in text
    assert text.startswith("ScanResult of ")
    assert "SinkScores[layer=6, head_index=6, key_pos=" in text
    assert "SuperNeurons[layer=6, neuron=512]" in text
    assert "sink_rate_pos0=" in text and "top_super_neuron=L0N504" in text


@pytest.mark.parametrize("stage", ["sinks", "aggregation", "super_neurons", "disparity"])
def test_stage_result_repr_is_compact_and_informative(default_scan, stage):
    res = getattr(default_scan, stage)
    text = repr(res)
    assert len(text) < 2000, len(text)
    assert "tensor(" not in text
    assert text.startswith(type(res).__name__ + res._dims_str())
    assert " in [" in text  # the value range
    # the other tensor fields by shape: e.g. SinkScores' above_eps[6, 6, 36]
    extra = next(f.name for f in dataclasses.fields(res) if f.name != "values" and isinstance(getattr(res, f.name), torch.Tensor))
    assert f"{extra}{list(getattr(res, extra).shape)}" in text
    assert res._summary_lines()[0][:40] in text


def test_patching_result_repr_is_compact(patching_result):
    text = repr(patching_result)
    assert len(text) < 2000, len(text)
    assert "tensor(" not in text
    assert text.startswith("PatchingResult" + patching_result._dims_str())
    assert "clean[3]" in text and "index: DataFrame[" in text
    big = PatchingResult(values=torch.randn(12, 100, 8), dims=("layer", "pos", "batch"), value_name="metric",
                         clean=torch.randn(8), corrupted=torch.randn(8),
                         index=pd.DataFrame({"layer": range(1200), "pos": range(1200)}), meta={"site": "resid_pre"})
    assert len(repr(big)) < 2000 and "tensor(" not in repr(big)


def test_subclasses_get_the_compact_repr_and_a_failing_summary_does_not_break_it():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Mine(SinkResult):
        extra: torch.Tensor

        def _summary_lines(self):
            raise ValueError("nothing to say")

    r = Mine(values=torch.arange(5000.0).reshape(50, 100), dims=("layer", "pos"), value_name="v", extra=torch.zeros(50, 100))
    text = repr(r)
    assert text.startswith("Mine[layer=50, pos=100] v in [0, 4999]") and "extra[50, 100]" in text
    assert "tensor(" not in text and len(text) < 500


# --------------------------------------------------------------------------- 2. save / load
def _roundtrip(result, tmp_path, name="r.safetensors"):
    path = tmp_path / name
    assert result.save(path) == path
    loaded = load_result(path)
    assert_same(result, loaded)
    assert_same(type(result).load(path), result)
    return loaded


def test_scan_result_roundtrip(tiny_scan, tmp_path):
    loaded = _roundtrip(tiny_scan, tmp_path)
    assert loaded.summary() == tiny_scan.summary()
    assert loaded.report() == tiny_scan.report()
    for stage in ("sinks", "aggregation", "super_neurons", "disparity"):
        pd.testing.assert_frame_equal(getattr(loaded, stage).to_frame(), getattr(tiny_scan, stage).to_frame())


def test_default_model_scan_roundtrip(default_scan, tmp_path):
    loaded = _roundtrip(default_scan, tmp_path)
    assert list(loaded.super_neurons.chain["label"]) == ["L0N504", "L2N168"]
    assert isinstance(loaded.super_neurons.found["top_dims"].iloc[0], list)


@pytest.mark.parametrize("stage", ["sinks", "aggregation", "super_neurons", "disparity"])
def test_stage_result_roundtrip(tiny_scan, tmp_path, stage):
    _roundtrip(getattr(tiny_scan, stage), tmp_path)


def test_partial_scan_and_weight_and_patching_results_roundtrip(tiny_llama, patching_result, tmp_path):
    partial = tl_sinks.scan(tiny_llama, random_prompts([6, 4]), stages=["sinks"], progress=False)
    assert partial.aggregation is None
    _roundtrip(partial, tmp_path, "partial.safetensors")
    _roundtrip(tl_sinks.find_super_neurons_by_weights(tiny_llama), tmp_path, "weights.safetensors")
    _roundtrip(patching_result, tmp_path, "patch.safetensors")


def test_sink_result_roundtrip_of_awkward_values(tmp_path):
    meta = {
        "tuple": (1, (2, "x")), "nan": float("nan"), "inf": -float("inf"), "int_keys": {1: "a", (2, 3): [None]},
        "set": {1, 2}, "nested": {"$t": "not a tag", "list": [True, 1.5, "s"]}, "tensor": torch.tensor([1, 2]),
        "frame": pd.DataFrame({"s": ["a", None], "f32": pd.Series([1.5, float("nan")], dtype="float32"),
                               "obj": [[1, 2], {"k": (3,)}], "b": [True, False], "i8": pd.Series([1, -2], dtype="int8"),
                               "nullable": pd.array([1, None], dtype="Int64")}, index=[10, 20]),
        "empty": pd.DataFrame(),
    }
    r = SinkResult(values=torch.randn(2, 3, dtype=torch.float64), dims=("layer", "pos"), value_name="v",
                   coords={"pos": ["<s>", "a", "b"]}, meta=meta)
    loaded = _roundtrip(r, tmp_path)
    assert loaded.meta["tuple"] == (1, (2, "x")) and loaded.meta["int_keys"][(2, 3)] == [None]
    assert loaded.values.dtype == torch.float64


def test_saved_file_is_plain_safetensors_with_json_metadata(tiny_scan, tmp_path):
    from safetensors import safe_open

    path = tiny_scan.sinks.save(tmp_path / "sinks.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "tl_sinks.result" and meta["class"] == "SinkScores"
    content = json.loads(meta["content"])
    assert content["fields"]["dims"] == {"$t": "tuple", "items": ["layer", "head_index", "key_pos"]}
    assert {"SinkScores.values", "SinkScores.above_eps"} <= keys
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_load_checks_the_class(tiny_scan, tmp_path):
    path = tiny_scan.sinks.save(tmp_path / "sinks.safetensors")
    assert isinstance(SinkResult.load(path), SinkScores)  # a subclass is a SinkResult
    with pytest.raises(ResultFileError) as e:
        ValueAggregation.load(path)
    assert_one_line_error(e, path, "holds a SinkScores, not a ValueAggregation")


# hostile and broken files ------------------------------------------------------
def _rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _content(change):
    def f(meta):
        c = json.loads(meta["content"])
        change(c)
        meta["content"] = json.dumps(c)

    return f


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda m: m.update(content="{not json"), "corrupt JSON"),
        (lambda m: m.update(format_version="99"), "format 99"),
        (lambda m: m.pop("format"), "not a tl_sinks result file"),
        (lambda m: (_content(lambda c: c.update({"class": "Popen"}))(m), m.update({"class": "Popen"})),
         "unknown result class 'Popen'"),
        (_content(lambda c: c["fields"]["meta"].update(x={"$t": "result", "class": "os.system", "fields": {}})),
         "unknown result class 'os.system'"),
        (_content(lambda c: c["fields"].update(values={"$t": "tensor", "key": "nowhere"})), "'nowhere'"),
        (_content(lambda c: c["fields"].update(values={"$t": "pickle", "data": "..."})), "unknown content tag 'pickle'"),
        (_content(lambda c: c["fields"].update(evil=1)), "no field(s) ['evil']"),
        (_content(lambda c: c["fields"].update(dims={"$t": "tuple", "items": ["layer"]})), "dims="),
        (_content(lambda c: c["fields"].update(values="rm -rf /")), "must be a tensor"),
        (_content(lambda c: c["fields"]["tokens"]["data"][0].update(dtype="float32")), "header says float32"),
        (_content(lambda c: c["fields"]["tokens"].update(n_rows=10**6)), "expected 1000000"),
        (_content(lambda c: c.update({"class": "SinkResult"})), "header names class 'SinkScores'"),
    ],
)
def test_tampered_files_give_one_line_errors(tiny_scan, tmp_path, tamper, needle):
    path = tiny_scan.sinks.save(tmp_path / "sinks.safetensors")
    _rewrite_header(path, tamper)
    with pytest.raises(ResultFileError) as e:
        load_result(path)
    assert_one_line_error(e, path, needle)


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["TL_SINKS_TEST_MARK"])),))


def test_non_result_files_are_refused_without_running_code(tiny_scan, tmp_path, monkeypatch):
    mark = tmp_path / "code_ran"
    monkeypatch.setenv("TL_SINKS_TEST_MARK", str(mark))
    pkl = tmp_path / "result.pkl"
    pkl.write_bytes(pickle.dumps(_Boom()))
    torch_file = tmp_path / "result.pt"
    torch.save({"values": torch.zeros(2)}, torch_file)
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    for path, needle in [(pkl, "not a tl_sinks result file"), (torch_file, "not a tl_sinks result file"),
                         (foreign, "no format='tl_sinks.result'"), (short, "too short"),
                         (tmp_path / "missing.safetensors", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(ResultFileError) as e:
            load_result(path)
        assert_one_line_error(e, path, needle)
    assert not mark.exists()
    # truncated tensor data
    good = tiny_scan.sinks.save(tmp_path / "good.safetensors")
    good.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(ResultFileError) as e:
        load_result(good)
    assert_one_line_error(e, good, "corrupt tensor data")


def test_failed_save_names_the_field_and_keeps_the_old_file(tiny_scan, tmp_path):
    path = tiny_scan.sinks.save(tmp_path / "sinks.safetensors")
    before = path.read_bytes()
    bad = dataclasses.replace(tiny_scan.sinks, meta={**tiny_scan.sinks.meta, "callback": print})
    with pytest.raises(ResultFileError) as e:
        bad.save(path)
    assert_one_line_error(e, path, "SinkScores.meta.callback is a builtin_function_or_method")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["sinks.safetensors"]
    with pytest.raises(ResultFileError) as e:
        tiny_scan.save(tmp_path / "no_such_dir" / "scan.safetensors")
    assert_one_line_error(e, tmp_path / "no_such_dir" / "scan.safetensors", "could not write")


# --------------------------------------------------------------------------- 3. cache=
def _assert_results_close(a, b, *, exact: bool, where: str = "result") -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if exact:
                assert_same(x, y, f"{where}.{f.name}")
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{where}.{f.name}")
        elif isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y, check_exact=exact, rtol=1e-5, atol=1e-6, obj=f"{where}.{f.name}")
        elif f.name == "meta":
            assert y["source"] == "cache" and "source" not in x
            drop = {"source", "batch_size"}
            assert {k: v for k, v in x.items() if k not in drop} == {k: v for k, v in y.items() if k not in drop}
        else:
            assert_same(x, y, f"{where}.{f.name}")


@pytest.mark.parametrize("stage", list(STAGE_FNS))
def test_stage_from_cache_matches_the_forward_pass_tiny_llama(tiny_llama, stage):
    fn = STAGE_FNS[stage]
    tokens = torch.tensor(random_prompts([8, 8, 8], seed=3))
    _, cache = tiny_llama.run_with_cache(tokens)
    _assert_results_close(fn(tiny_llama, tokens, progress=False), fn(tiny_llama, tokens, cache=cache), exact=True)
    # ragged prompts: a right-padded batch with its mask, against the forward pass in batches of 2
    prompts = random_prompts([9, 4, 6], seed=4)
    padded = torch.zeros((3, 9), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    _, cache = tiny_llama.run_with_cache(padded, attention_mask=mask)
    from_cache = fn(tiny_llama, padded, attention_mask=mask, cache=cache)
    _assert_results_close(fn(tiny_llama, prompts, batch_size=2, progress=False), from_cache, exact=False)


def test_scan_from_cache_matches_the_forward_pass_default_model(default_model):
    texts = tl_sinks.builtin_prompts()[:6]
    tokens, mask = right_padded(default_model, texts)
    _, cache = default_model.run_with_cache(tokens, attention_mask=mask)
    forward = tl_sinks.scan(default_model, tokens, attention_mask=mask, progress=False)
    cached = tl_sinks.scan(default_model, tokens, attention_mask=mask, cache=cache)
    for stage in STAGE_FNS:
        _assert_results_close(getattr(forward, stage), getattr(cached, stage), exact=True, where=stage)
    assert cached.summary() == forward.summary()
    # strings, forward in batches of 2: the same numbers up to summation order
    by_text = tl_sinks.compute_sink_scores(default_model, texts, batch_size=2, progress=False)
    torch.testing.assert_close(by_text.values, cached.sinks.values, rtol=1e-5, atol=1e-6)


def test_stage_from_a_filtered_mapping(tiny_llama):
    tokens = torch.tensor(random_prompts([7, 7], seed=5))
    _, cache = tiny_llama.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    as_dict = {k: v for k, v in cache.items()}
    a = tl_sinks.compute_sink_scores(tiny_llama, tokens, cache=as_dict)
    b = tl_sinks.compute_sink_scores(tiny_llama, tokens, progress=False)
    _assert_results_close(b, a, exact=True)
    del as_dict["blocks.1.attn.hook_pattern"]
    with pytest.raises(ValueError, match=r"the cache lacks blocks\.1\.attn\.hook_pattern, which the sinks stage reads"):
        tl_sinks.compute_sink_scores(tiny_llama, tokens, cache=as_dict)
    with pytest.raises(ValueError, match=r"the cache lacks blocks\.0\.attn\.hook_z \(and 1 more: blocks\.1\.attn\.hook_z\)"):
        tl_sinks.compute_value_aggregation(tiny_llama, tokens, cache=cache)
    with pytest.raises(ValueError, match=r"lacks blocks\.0\.mlp\.hook_post"):
        tl_sinks.find_super_neurons(tiny_llama, tokens, cache=cache)
    with pytest.raises(ValueError, match=r"lacks blocks\.0\.hook_resid_pre .*which the disparity stage reads"):
        tl_sinks.compute_dimension_disparity(tiny_llama, tokens, cache=cache)


def test_disparity_from_cache_names_the_attention_input_site(tiny_llama):
    tokens = torch.tensor(random_prompts([7, 7], seed=6))
    _, cache = tiny_llama.run_with_cache(tokens)
    partial = {k: v for k, v in cache.items() if "ln1.hook_out" not in k}
    with pytest.raises(ValueError, match=r"lacks blocks\.0\.ln1\.hook_out"):
        tl_sinks.compute_dimension_disparity(tiny_llama, tokens, cache=partial)


def test_cache_still_needs_matching_valid_tokens(tiny_llama):
    tokens = torch.tensor(random_prompts([7, 7, 7], seed=7))
    _, cache = tiny_llama.run_with_cache(tokens)
    with pytest.raises(ValueError, match="tokens the cache was computed on"):
        tl_sinks.compute_sink_scores(tiny_llama, None, cache=cache)
    with pytest.raises(ValueError, match=r"3, 4, 7, 7\)?.*but 2 prompt\(s\) were given"):
        tl_sinks.compute_sink_scores(tiny_llama, tokens[:2], cache=cache)
    with pytest.raises(ValueError, match="longest prompt has 9 tokens"):
        tl_sinks.compute_sink_scores(tiny_llama, torch.tensor(random_prompts([9, 9, 9])), cache=cache)
    no_bos = tokens.clone()
    no_bos[:, 0] = 10
    with pytest.raises(ValueError, match="do not start with BOS"):
        tl_sinks.compute_sink_scores(tiny_llama, no_bos, cache=cache)
    left = torch.zeros((2, 7), dtype=torch.long)
    left[0] = tokens[0]
    left[1, 2:] = tokens[1, :5]
    mask = (left != 0).long()
    with pytest.raises(ValueError, match="must be right-padded"):
        tl_sinks.compute_sink_scores(tiny_llama, left, attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match="interventions cannot be applied to a precomputed cache"):
        tl_sinks.scan(tiny_llama, tokens, stages=["sinks"], cache=cache, interventions=ScaleOutput(pos=1, lam=2.0))


def test_cache_without_batch_dim(tiny_llama):
    tokens = torch.tensor(random_prompts([7], seed=8))
    _, cache = tiny_llama.run_with_cache(tokens, remove_batch_dim=True)
    _assert_results_close(tl_sinks.compute_sink_scores(tiny_llama, tokens, progress=False),
                          tl_sinks.compute_sink_scores(tiny_llama, tokens, cache=cache), exact=True)


# --------------------------------------------------------------------------- 4. one spec, progress defaults
def test_a_single_spec_is_accepted_where_a_list_is(tiny_llama):
    spec = AblateNeurons(neurons=((1, 3),), pos=0)
    one = intervention_hooks(tiny_llama, spec)
    assert [n for n, _ in one] == [n for n, _ in intervention_hooks(tiny_llama, [spec])] and one
    with pytest.raises(TypeError):  # beartype (under the test suite's runtime checks) or the function itself
        intervention_hooks(tiny_llama, 3)
    prompts = random_prompts([6, 6])
    a = tl_sinks.scan(tiny_llama, prompts, stages=["sinks"], interventions=spec, progress=False)
    b = tl_sinks.scan(tiny_llama, prompts, stages=["sinks"], interventions=[spec], progress=False)
    assert torch.equal(a.sinks.values, b.sinks.values) and a.meta["interventions"] == b.meta["interventions"]
    tokens = torch.tensor(prompts)
    with intervene(tiny_llama, SelfOnlyMask(pos=3)):
        masked = tiny_llama(tokens)
    assert not torch.equal(masked, tiny_llama(tokens))


def test_progress_defaults_are_consistent():
    from tl_sinks.report import build_report
    from tl_sinks.trace import trace_chain

    long_running = [tl_sinks.scan, patch_sweep, trace_chain, build_report, *STAGE_FNS.values()]
    defaults = {f.__name__: inspect.signature(f).parameters["progress"].default for f in long_running}
    assert set(defaults.values()) == {True}, defaults
