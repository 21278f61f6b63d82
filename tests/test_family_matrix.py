"""The family matrix: patching, sink scans and the chain trace on one tiny random checkpoint per
architecture family (see :mod:`tests.families`), each against an independent reference.

* ``patch_sweep`` with its default shortcuts equals ``transformer_lens.patching`` (one forward
  pass per patch) and passes its own self-check.
* ``scan``'s sink numbers equal those computed from plain transformers (eager attention,
  ``output_attentions=True``) on the token ids tl_sinks ran.
* ``trace_chain`` runs with its defaults on every decoder.

Where the current code fails with default arguments the case is a strict xfail naming issue 13,
so it turns red once fixed, and a companion test runs the same check with the non-default
arguments that work today.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformer_lens import patching as tlp
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

import tl_sinks
from tests.families import FAMILIES, VOCAB, build_family
from tests.helpers import BOS, N_SPECIAL
from tl_sinks.patching import clear_self_checks, logit_diff_metric, patch_sweep
from tl_sinks.trace import trace_chain

NAMES = list(FAMILIES)
DECODERS = [n for n in NAMES if FAMILIES[n].causal]
# Ordinary-token indices of the scan prompts (padded into one batch by tl_sinks).
PROMPTS = [[3, 17, 8, 40, 22, 5, 11], [9, 30, 2, 14], [6, 25, 19, 1, 33]]
EPS = 0.3  # scan's default sink-rate threshold

# --------------------------------------------------------------------------- known failures
# Families that need non-default arguments with the current TransformerLens (NO_BOS: it sets
# default_prepend_bos=False, so its tokenizer-free default would drop BOS; tl_sinks now follows
# the checkpoint's own tokenizer instead). Issue 13 (A) GPT-NeoX, Qwen2/3, Phi, BLOOM refused
# text prompts, (B) OPT with ffn_dim != 4*hidden crashed the super-neuron stage, (C) OLMo 2 had no
# attention-input hook: all fixed, so no family is a known failure; the explicit arguments that
# used to be needed are still tested below.
NO_BOS = {"gpt_neox", "qwen2", "qwen3", "phi", "bloom"}
# family -> (exception type, message pattern, reason): a strict xfail on exactly that error.
KNOWN: dict[str, tuple[type[Exception], str, str]] = {}
# Explicit arguments (what these families needed before the defaults followed the tokenizer).
SCAN_WORKAROUND = {
    **{n: {"prepend_bos": True} for n in NO_BOS},
    "opt": {"stages": ["sinks", "aggregation", "disparity"]},
    "olmo2": {"stages": ["sinks", "aggregation", "super_neurons"]},
}
TRACE_WORKAROUND = {n: {"prepend_bos": True} for n in NO_BOS}  # trace_chain has no stages argument


class KnownFailure(Exception):
    """A family's documented failure (KNOWN), raised by :func:`known_failure`."""


@contextmanager
def known_failure(family: str) -> Iterator[None]:
    """Turn the family's known error (type and message) into :class:`KnownFailure`.

    The strict xfails expect only that, so another error of the same type still fails.
    """
    if family not in KNOWN:
        yield
        return
    exc_type, pattern, _ = KNOWN[family]
    try:
        yield
    except exc_type as e:
        if re.search(pattern, str(e)):
            raise KnownFailure(f"{type(e).__name__}: {e}") from e
        raise


def _cases(names):
    out = []
    for n in names:
        marks = [pytest.mark.xfail(strict=True, raises=KnownFailure, reason=KNOWN[n][2])] if n in KNOWN else []
        out.append(pytest.param(n, marks=marks, id=n))
    return out


# --------------------------------------------------------------------------- fixtures
class Zoo:
    """Builds each family's checkpoint once per session, and loads it both ways on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}
        self._models: dict[str, object] = {}
        self._hf: dict[str, torch.nn.Module] = {}

    def path(self, name: str) -> Path:
        if name not in self._paths:
            self._paths[name] = build_family(name, self.root / name, seed=NAMES.index(name))
        return self._paths[name]

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = tl_sinks.load_model(self.path(name), device="cpu")
        return self._models[name]

    def hf(self, name: str) -> torch.nn.Module:
        if name not in self._hf:
            auto = AutoModelForCausalLM if FAMILIES[name].causal else AutoModelForMaskedLM
            self._hf[name] = auto.from_pretrained(self.path(name), attn_implementation="eager").eval()
        return self._hf[name]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on shared cores: one intra-op thread is ~20x faster than torch's default
    # (threads spinning against each other and against other processes). Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("families"))


# --------------------------------------------------------------------------- (a) patching
def patch_inputs(seed: int = 0):
    """2 prompts x 7 tokens starting with BOS, token 3 corrupted, a logit-difference metric."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(N_SPECIAL, VOCAB, (2, 7), generator=g)
    clean[:, 0] = BOS
    corrupted = clean.clone()
    corrupted[:, 3] = N_SPECIAL + (clean[:, 3] - N_SPECIAL + 1) % (VOCAB - N_SPECIAL)
    metric = logit_diff_metric(torch.tensor([10, 11]), torch.tensor([20, 21]))
    return clean, corrupted, metric


TL_FUNCTIONS = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "z": tlp.get_act_patch_attn_head_out_by_pos,
    "k": tlp.get_act_patch_attn_head_k_by_pos,
}
PATCH_CASES = [(n, s) for n in NAMES for s in ("resid_pre", "z")] + [("llama", "k")]  # llama: GQA, 2 kv heads


def patch_against_transformer_lens(model, site: str):
    """``(ours, reference)``: patch_sweep with defaults (self-check on, RuntimeWarnings raised)."""
    clean, corrupted, metric = patch_inputs()
    clear_self_checks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ours = patch_sweep(model, corrupted, clean, metric, site=site)
    _, cache = model.run_with_cache(clean)
    ref = TL_FUNCTIONS[site](model, corrupted, cache, metric, reduce="none")
    return ours, (ref.values if hasattr(ref, "values") else ref).float().cpu()


@pytest.mark.parametrize(("family", "site"), PATCH_CASES, ids=[f"{n}-{s}" for n, s in PATCH_CASES])
def test_patch_sweep_matches_transformer_lens(zoo, family, site):
    model = zoo.model(family)
    ours, ref = patch_against_transformer_lens(model, site)
    assert tuple(ours.values.shape) == tuple(ref.shape)
    assert float((ref - ours.corrupted[None]).abs().max()) > 0.05  # the patches move the metric
    torch.testing.assert_close(ours.values, ref, rtol=1e-4, atol=1e-5)
    check = ours.meta["self_check"]
    assert check["failed"] == [] and check["checked"], check
    if site == "k":
        assert ours.dims[2] == "kv_head_index"
        assert ours.values.shape[2] == model.cfg.n_key_value_heads < model.cfg.n_heads


# --------------------------------------------------------------------------- (b) sinks vs HF
def hf_sink_reference(hf, ids: list[list[int]], causal: bool) -> dict[str, torch.Tensor]:
    """Mean attention received per (layer, head, key), from HF eager attentions, one prompt at a time.

    ``alpha[l, h, k]`` of a prompt is the mean of ``A[q, k]`` over the queries that see ``k``
    (``q >= k`` if causal, all otherwise); averaged over the prompts that reach ``k``. The sink
    indicator ``alpha > EPS`` is taken per prompt, then averaged the same way.
    """
    P = max(len(t) for t in ids)
    total = above = n = None
    for t in ids:
        with torch.no_grad():
            att = hf(torch.tensor([t]), output_attentions=True).attentions
        A = torch.stack([a[0].double() for a in att])  # [layer, head, q, k]
        L, H, T, _ = A.shape
        if total is None:
            total = torch.zeros(L, H, P, dtype=torch.float64)
            above = torch.zeros(L, H, P, dtype=torch.float64)
            n = torch.zeros(P, dtype=torch.float64)
        for k in range(T):
            qs = list(range(k, T)) if causal else list(range(T))
            alpha = A[:, :, qs, k].mean(-1)
            total[:, :, k] += alpha
            above[:, :, k] += (alpha > EPS).double()
            n[k] += 1
    return {"values": total / n, "above_eps": above / n, "sink_rate0": (above[:, :, 0] / n[0]).mean()}


def scan_against_hugging_face(zoo: Zoo, family: str, **kwargs):
    """Run ``tl_sinks.scan`` on the family's text prompts and compare its sink stage with HF.

    Returns ``(result, max |delta alpha|)``. The reference runs on the HF tokenizer's ids,
    which must equal the ones tl_sinks ran (``model.to_tokens`` with the scan's prepend_bos).
    """
    fam = FAMILIES[family]
    model = zoo.model(family)
    texts = [fam.text(p) for p in PROMPTS]
    result = tl_sinks.scan(model, texts, progress=False, **kwargs)
    prepend = result.meta["prepend_bos"]  # as passed (None: the model's default)
    ran = [model.to_tokens(s, prepend_bos=prepend, move_to_device=False, truncate=False)[0].tolist() for s in texts]
    tok = AutoTokenizer.from_pretrained(zoo.path(family))
    assert ran == [tok(s)["input_ids"] for s in texts]
    assert all(t[0] == BOS for t in ran)
    ref = hf_sink_reference(zoo.hf(family), ran, fam.causal)
    s = result.sinks
    assert float((ref["values"][:, :, 0] - s.uniform[0]).abs().max()) > 0.05  # attention is far from uniform
    torch.testing.assert_close(s.values.double(), ref["values"], rtol=0, atol=1e-5)
    torch.testing.assert_close(s.above_eps.double(), ref["above_eps"], rtol=0, atol=1e-5)
    assert s.sink_rate(0) == pytest.approx(float(ref["sink_rate0"]), abs=1e-5)
    assert s.mean_received(0) == pytest.approx(float(ref["values"][:, :, 0].mean()), abs=1e-5)
    return result, float((s.values.double() - ref["values"]).abs().max())


@pytest.mark.parametrize("family", _cases(NAMES))
def test_scan_sinks_match_hugging_face_eager(zoo, family):
    with known_failure(family):
        result, _ = scan_against_hugging_face(zoo, family)
    assert result.meta["pos0_is_bos"] is True


@pytest.mark.parametrize("family", sorted(SCAN_WORKAROUND))
def test_scan_sinks_match_hugging_face_eager_with_workaround(zoo, family):
    kwargs = SCAN_WORKAROUND[family]
    result, _ = scan_against_hugging_face(zoo, family, **kwargs)
    if "stages" in kwargs:
        ran = [st for st in ("sinks", "aggregation", "super_neurons", "disparity") if getattr(result, st) is not None]
        assert ran == kwargs["stages"]


# --------------------------------------------------------------------------- (c) trace_chain
def run_trace(zoo: Zoo, family: str, **kwargs):
    fam = FAMILIES[family]
    model = zoo.model(family)
    trace = trace_chain(model, [fam.text(p) for p in PROMPTS], progress=False, **kwargs)
    n_layers = model.cfg.n_layers
    n_conditions = 2 + 2 * len(trace.meta["lambdas"])
    assert len(trace.sweep) == n_conditions * n_layers
    assert all(math.isfinite(v) for v in trace.sweep["received"])
    assert all(math.isfinite(v) for v in trace.links[["baseline", "intervened"]].to_numpy().ravel())
    none = trace.sweep[trace.sweep["intervention"] == "none"]
    assert list(none["received"]) == list(none["baseline_received"])
    return trace


@pytest.mark.parametrize("family", _cases(DECODERS))
def test_trace_chain_runs_with_defaults(zoo, family):
    with known_failure(family):
        run_trace(zoo, family)


@pytest.mark.parametrize("family", sorted(TRACE_WORKAROUND))
def test_trace_chain_runs_with_workaround(zoo, family):
    run_trace(zoo, family, **TRACE_WORKAROUND[family])
