"""Hostile and broken files: token strings that try to run script in the report, checkpoints
whose pickle runs code, writes that fail half-way, output paths that would destroy inputs, and
prompt files that are not UTF-8 text. Each case fails with one clear line, never a traceback,
and never harms a file it was not asked to write."""

from __future__ import annotations

import errno
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import tl_sinks
from tests.conftest import llama_config, seed_all
from tests.helpers import BOS, build_tokenizer, chromium, save_hf
from tl_sinks import _io
from tl_sinks.cli import main
from tl_sinks.errors import ModelLoadError
from tl_sinks.report import build_report, write_report
from tl_sinks.train.default_model import DEFAULT_MODEL_DIR
from tl_sinks.viz import show_attention, show_neuron_activations, show_tokens
from tl_sinks.viz.views import MARKUP_BREAK, OfflineView, props_json, script_json

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PWN = "</script><script>window.__pwned=1</script>"
# circuitsvis puts some token strings into the page as markup: the <img> would run there.
XSS = "<img/src/onerror=window.__pwned=1>"
HOSTILE = [PWN, XSS, "<s>", "a & b", "<!--", "line\u2028sep\u2029end", "</SCRIPT >"]
NAME = "<img src=x onerror=alert(1)>"


def _script_bodies(page: str) -> list[str]:
    # How the HTML parser splits a page: a <script> ends at the first "</script", whatever the JS says.
    return re.findall(r"<script>(.*?)</script", page, flags=re.S | re.I)


def _render_payload(body: str) -> tuple[str, object]:
    m = re.fullmatch(r'CircuitsVis\.render\("tl-sinks-cv-[0-9a-f]+", CircuitsVis\.(\w+), (.*)\);', body, flags=re.S)
    assert m is not None, f"not one whole render call: {body[:200]!r}"
    return m.group(1), json.loads(m.group(2))


def _sent_tokens(element: str, props: dict) -> list[str]:
    """The token strings a view shows: markup props arrive with a joiner after what would open
    markup (so none does), the sink mark removed."""
    toks = props["tokens"]
    if element != "AttentionHeads":
        assert not any(re.search(r"<[A-Za-z/!?]|&[A-Za-z0-9#]", t) for t in toks), toks
        toks = [t.replace(MARKUP_BREAK, "") for t in toks]
    return [t.removeprefix("⟦sink⟧ ") for t in toks]


def _chromium(page: str, tmp_path: Path, *args: str) -> str:
    return chromium(page, tmp_path, *args)


def _one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("tl-sinks: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- 1. script injection
def test_script_json_escapes_what_could_end_the_script():
    text = script_json({"tokens": HOSTILE, "x": [1.5, None, True]})
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert "\\u003c/script\\u003e" in text and "\\u2028" in text and "\\u0026" in text
    assert json.loads(text) == {"tokens": HOSTILE, "x": [1.5, None, True]}


def test_views_keep_hostile_strings_inside_their_script():
    p = torch.softmax(torch.randn(2, len(HOSTILE), len(HOSTILE)), -1).tril()
    views = [
        show_attention(p, HOSTILE, head_names=[PWN, "<b>h</b>"], max_pos=len(HOSTILE)),
        show_tokens(HOSTILE, torch.rand(len(HOSTILE), 2), labels=[PWN, "&"]),
        show_neuron_activations(HOSTILE, torch.randn(len(HOSTILE), 1), neuron_labels=[PWN]),
    ]
    for v in views:
        frag = v.fragment()
        bodies = _script_bodies(frag)
        assert len(bodies) == 1 and frag.lower().count("</script") == 1  # nothing closes it early
        element, props = _render_payload(bodies[0])
        assert element == v.element and props == json.loads(props_json(v))
        assert _sent_tokens(element, props) == HOSTILE  # the strings arrive intact
    assert json.loads(props_json(views[0]))["attentionHeadNames"][0].startswith(PWN)  # labels are text
    assert json.loads(props_json(views[1]))["labels"] == [PWN, "&"]
    with pytest.raises(ValueError, match="component name"):
        OfflineView("AttentionHeads, alert(1)", {})


def test_bundle_has_no_closing_script_tag():
    from tl_sinks.viz.views import circuitsvis_bundle

    assert "</script" not in circuitsvis_bundle().lower()
    assert "<\\/script>" in circuitsvis_bundle()  # React's innerHTML string, kept (escaped), not deleted


@pytest.fixture(scope="module")
def hostile_model_dir(tmp_path_factory):
    """A tiny Llama whose vocabulary holds the hostile strings, in a directory named like markup."""
    seed_all(4)
    tok = build_tokenizer(64)
    tok.add_tokens(HOSTILE)  # each decodes, alone, to one hostile string
    model = LlamaForCausalLM(llama_config(vocab_size=len(tok)))
    return save_hf(model, tok, tmp_path_factory.mktemp("models") / NAME)


@pytest.fixture(scope="module")
def hostile_report(hostile_model_dir):
    model = tl_sinks.load_model(hostile_model_dir, device="cpu")
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in HOSTILE]
    assert [model.tokenizer.decode([i]) for i in ids] == HOSTILE
    prompts = torch.tensor([[BOS, *ids, 10, 11], [BOS, 12, 13, *ids[::-1]]])
    return build_report(model, prompts, trace=False, progress=False)


def test_report_escapes_names_and_tokens(hostile_report):
    page = hostile_report
    assert NAME not in page and html.escape(NAME) in page  # title, heading, provenance
    assert PWN not in page and "window.__pwned" in page
    bodies = _script_bodies(page)
    assert len(bodies) == 1 + page.count("CircuitsVis.render(")  # the bundle, then one per view
    payloads = [_render_payload(b) for b in bodies[1:]]
    assert len(payloads) >= 2
    for element, props in payloads:
        assert set(HOSTILE) <= set(_sent_tokens(element, props))


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TL_SINKS_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (CI installs it and sets TL_SINKS_REQUIRE_BROWSER=1)")
def test_report_does_not_run_injected_script_in_chromium(hostile_report, tmp_path):
    assert CHROMIUM is not None, "TL_SINKS_REQUIRE_BROWSER is set but chromium is not installed"
    probe = "<script>document.body.setAttribute('data-pwned', String(window.__pwned === 1));</script>"
    dom = _chromium(hostile_report.replace("\n</body>", probe + "\n</body>"), tmp_path, "--dump-dom")
    assert 'data-pwned="false"' in dom, "the probe did not run, or the injected script did"
    views = re.findall(r'<div id="(tl-sinks-cv-[0-9a-f]+)"[^>]*>(.*?)</div>', dom, flags=re.S)
    assert views and all(len(inner) > 50 for _, inner in views), "a view did not render"
    assert html.escape(PWN, quote=False) in dom.replace(MARKUP_BREAK, "")  # shown as text in the widget


# Hovers token HOVER of every token view (as the mouse does: react-popper-tooltip listens for
# mouseenter/mousemove on the token), then records each view's token text and tooltip title.
HOVER_PROBE = """<script>
setTimeout(() => {
  const triggers = (v) => v.querySelectorAll('.colored-tokens > span');
  const views = [...document.querySelectorAll('.tl-sinks-view')];
  for (const v of views) {
    const t = triggers(v)[Number(v.dataset.hover)], r = t.getBoundingClientRect();
    const at = {clientX: r.left + 4, clientY: r.bottom - 2, bubbles: true};
    t.dispatchEvent(new MouseEvent('mouseenter', at));
    t.dispatchEvent(new MouseEvent('mousemove', at));
    setTimeout(() => t.dispatchEvent(new MouseEvent('mousemove', at)), 200);  // the tooltip exists now: place it
  }
  setTimeout(() => {
    const seen = views.map((v) => {
      const t = triggers(v)[Number(v.dataset.hover)], tip = t.nextElementSibling;
      return {token: t.textContent, tooltip: tip ? tip.querySelector('strong, div').textContent : null};
    });
    document.body.setAttribute('data-seen', JSON.stringify(seen));
    document.body.setAttribute('data-pwned', String(window.__pwned === 1));
  }, 500);
}, 1000);
</script>"""


def _hover_page(views: list[tuple[OfflineView, int]]) -> str:
    from tl_sinks.viz.views import circuitsvis_bundle

    body = "\n".join(v.fragment().replace('class="tl-sinks-view"', f'class="tl-sinks-view" data-hover="{i}"', 1)
                     for v, i in views)
    return (f"<!doctype html><html><head><meta charset='utf-8'><script>{circuitsvis_bundle()}</script></head>"
            f"<body style='font-size: 20px'>{body}{HOVER_PROBE}</body></html>")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TL_SINKS_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (CI installs it and sets TL_SINKS_REQUIRE_BROWSER=1)")
def test_token_and_its_tooltip_read_the_token_in_chromium(tmp_path):
    # circuitsvis shows one string twice: as markup (the token) and as text (the hover tooltip).
    toks = ["<s>", XSS, "a & b", "&lt;", "x"]
    one = lambda: show_tokens(toks, torch.arange(5.0))  # noqa: E731 (a fresh view, a fresh element id)
    multi = lambda: show_neuron_activations(toks, torch.randn(5, 2), neuron_labels=["L0N1", "&"])  # noqa: E731
    cases = [(one(), 0), (multi(), 0), (one(), 1), (multi(), 3)]  # <s> in both views, the <img> token, a literal "&lt;"
    dom = _chromium(_hover_page(cases), tmp_path, "--dump-dom")
    assert 'data-pwned="false"' in dom, "the probe did not run, or the injected script did"
    seen = json.loads(html.unescape(re.search(r'data-seen="([^"]*)"', dom).group(1)))
    for (view, i), s in zip(cases, seen):
        assert s["tooltip"] is not None, f"no tooltip on {view.element} token {i}"
        # What a reader sees: the token's own characters, in the token and in its tooltip;
        # the only extra is the invisible joiner that keeps "<s" from opening a tag.
        assert s["token"].replace(MARKUP_BREAK, "") == s["tooltip"].replace(MARKUP_BREAK, "") == toks[i]
        assert "&lt;" not in s["tooltip"] or toks[i] == "&lt;"
    assert [s["tooltip"] for s in seen[:2]] == ["<\u2060s>", "<\u2060s>"]
    shots = os.environ.get("TL_SINKS_SCREENSHOT_DIR")  # to look at the tooltips: one PNG per view
    for k, (view, i) in enumerate(cases if shots else []):
        png = Path(shots) / f"tooltip_{k}_{view.element}_token{i}.png"
        _chromium(_hover_page([(view, i)]), tmp_path / str(k), f"--screenshot={png}", "--window-size=700,300")


# --------------------------------------------------------------------------- 2. checkpoints
TINY = dict(
    d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=320, seq_len=32, steps=2, batch_size=4,
    warmup=1, packages=(), max_documents=150, eval_every=2, eval_batches=1, checkpoint_every=2, num_threads=1,
)


class _RunsCode:
    """Unpickling this creates ``path``: the smallest stand-in for a malicious checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory):
    from tl_sinks.train import TrainConfig
    from tl_sinks.train.trainer import prepare_data

    d = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(TrainConfig(**TINY), d, progress=False)
    return d


def _run_dir(tmp_path: Path, prepared_data: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(prepared_data, run / "data")  # train() reuses it (same data key)
    return run


def test_resume_refuses_a_checkpoint_that_runs_code(tmp_path, prepared_data):
    from tl_sinks.train import TrainConfig, train

    run = _run_dir(tmp_path, prepared_data)
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker), "step": 0}, run / "checkpoint.pt")
    with pytest.raises(ValueError) as info:
        train(TrainConfig(**TINY), run, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and str(run / "checkpoint.pt") in msg and "refusing" in msg
    assert not marker.exists()


def test_resume_refuses_a_corrupt_or_foreign_checkpoint(tmp_path, prepared_data):
    from tl_sinks.train import TrainConfig, train

    run = _run_dir(tmp_path, prepared_data)
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ValueError, match="not a readable checkpoint") as info:
        train(TrainConfig(**TINY), run, progress=False)
    assert "\n" not in str(info.value) and str(ckpt) in str(info.value)
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(ValueError, match="not a tl_sinks checkpoint"):
        train(TrainConfig(**TINY), run, progress=False)


def test_checkpoint_holds_plain_rng_states_that_restore(tmp_path):
    import random

    import numpy as np

    from tl_sinks.train.trainer import _load_checkpoint, _rng_states, _set_rng_states

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save({**_rng_states(), "model": {}, "optimizer": {}, "sampler": torch.Generator().get_state(),
                "step": 0, "log": {}, "config": {}}, path)
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(1))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    _set_rng_states(_load_checkpoint(path, "cpu"))  # weights_only=True: plain data only
    assert (random.random(), np.random.standard_normal(), np.random.rand()) == expected[:3]
    torch.testing.assert_close(torch.rand(1), expected[3], rtol=0, atol=0)


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from tl_sinks.train import TrainConfig, trainer

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    cfg, gen, ckpt = TrainConfig(**TINY), torch.Generator().manual_seed(0), tmp_path / "checkpoint.pt"
    trainer._save_checkpoint(ckpt, model, opt, gen, 1, {"train": []}, cfg)
    good = ckpt.read_bytes()

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        trainer._save_checkpoint(ckpt, model, opt, gen, 2, {"train": []}, cfg)
    assert ckpt.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert trainer._load_checkpoint(ckpt, "cpu")["step"] == 1


# --------------------------------------------------------------------------- 3. atomic writes
def _fail_fsync(monkeypatch):
    def boom(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_io.os, "fsync", boom)


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    _io.atomic_write_text(out, "good")
    out.chmod(0o640)
    _io.atomic_write_text(out, "better")
    assert out.read_text() == "better" and (out.stat().st_mode & 0o777) == 0o640  # mode kept

    def half_then_fail(f):
        f.write(b"trunc")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write(out, half_then_fail)
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError, match="Input/output"):
        _io.atomic_write_text(out, "new text that never lands")
    assert out.read_text() == "better" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_follows_a_symlink(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    _io.atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


class _StubModel:
    """Enough of tl_sinks.ModelLike for write_report's signature (build_report is replaced)."""

    cfg = hook_dict = None

    def run_with_cache(self, *a, **k): ...
    def run_with_hooks(self, *a, **k): ...
    def hooks(self, *a, **k): ...
    def to_tokens(self, *a, **k): ...


def test_report_and_view_writes_are_atomic(tmp_path, monkeypatch):
    page, view_page = tmp_path / "report.html", tmp_path / "view.html"
    page.write_text("good report")
    view_page.write_text("good view")
    monkeypatch.setattr("tl_sinks.report.build_report", lambda *a, **k: "<html>new</html>")
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError):
        write_report(_StubModel(), page)
    with pytest.raises(OSError):
        show_tokens(["a"], [1.0]).save(view_page)
    assert page.read_text() == "good report" and view_page.read_text() == "good view"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "view.html"]


def test_cli_json_write_failure_keeps_the_old_file(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    prompts, out = tmp_path / "p.txt", tmp_path / "out.json"
    prompts.write_text("w1 w2 w3 w4\n")
    out.write_text('{"good": true}')
    _fail_fsync(monkeypatch)
    rc = main(["scan", "--model", str(tiny_llama_dir), "--prompts", str(prompts), "--json", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "--json", "could not write")
    assert out.read_text() == '{"good": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "p.txt"]


def test_my_modules_write_files_only_through_io():
    root = Path(tl_sinks.__file__).parent
    for rel in ("cli.py", "report.py", "viz/views.py", "train/trainer.py", "train/default_model.py"):
        src = (root / rel).read_text()
        # Direct writes; np.save / torch.save only into atomic_write's temporary file object f.
        assert not re.search(r"\.write_(text|bytes)\(|\b(np|torch)\.save\((?!f, )(?![^\n]*, f\))", src), rel


# --------------------------------------------------------------------------- 4. output paths
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model (checks must come first)."""
    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tl_sinks, "load_model", load_model)


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("w1 w2 w3\nw4 w5 w6\n")
    return p


@pytest.mark.parametrize("cmd,flag", [("scan", "--json"), ("report", "--out")])
def test_cli_refuses_bad_output_paths_before_loading(cmd, flag, tmp_path, prompts_file, tiny_llama_dir, no_model, capsys):
    before = prompts_file.read_bytes()
    link = tmp_path / "link.txt"
    link.symlink_to(prompts_file)
    cases = [
        (tmp_path / "no_such_dir" / "out", "does not exist"),
        (tmp_path, "is a directory"),
        (prompts_file, "is the --prompts file"),
        (link, "is the --prompts file"),
        (tiny_llama_dir / "out.html", "inside the model directory"),
        (DEFAULT_MODEL_DIR / "out.html", "inside the model directory"),
    ]
    if Path("/proc/self").is_dir():  # to root, os.access calls /proc writable, yet it refuses new files
        cases.append((Path("/proc/tl_sinks_out"), "cannot create files" if os.geteuid() == 0 else "not writable"))
    for path, why in cases:
        rc = main([cmd, "--model", str(tiny_llama_dir), "--prompts", str(prompts_file), flag, str(path), "--no-progress"])
        assert rc == 2, (path, why)
        _one_error_line(capsys.readouterr().err, "tl-sinks: error:", f"{flag} {path}", why)
    assert prompts_file.read_bytes() == before
    assert not (tiny_llama_dir / "out.html").exists() and not (DEFAULT_MODEL_DIR / "out.html").exists()


def test_cli_refuses_to_write_into_the_default_model(no_model, capsys):
    rc = main(["scan", "--json", str(DEFAULT_MODEL_DIR / "config.json")])
    assert rc == 2
    _one_error_line(capsys.readouterr().err, "inside the model directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere (the /proc case covers an unwritable directory)")
def test_cli_refuses_an_unwritable_directory(tmp_path, no_model, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["scan", "--json", str(ro / "x.json")]) == 2
        _one_error_line(capsys.readouterr().err, "--json", "not writable")
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------- 5. prompts, device, errors
@pytest.mark.parametrize("data,why", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    ("caf\u00e9 au lait\n".encode("latin-1"), "not UTF-8"),
    (b"", "no prompts"),
    (b"# only a comment\n\n", "no prompts"),
])
def test_cli_refuses_unreadable_prompt_files(data, why, tmp_path, no_model, capsys):
    p = tmp_path / "prompts.txt"
    p.write_bytes(data)
    assert main(["scan", "--prompts", str(p)]) == 2
    _one_error_line(capsys.readouterr().err, f"--prompts {p}", why)
    assert main(["scan", "--prompts", str(tmp_path / "missing.txt")]) == 2
    _one_error_line(capsys.readouterr().err, "no such file")


def test_cli_prompts_strip_bom_and_skip_comments_like_builtin(tiny_llama_dir, tmp_path, monkeypatch):
    from tl_sinks import cli

    shipped = Path(tl_sinks.__file__).parent / "data" / "prompts.txt"
    assert cli._read_prompts(str(shipped)) == tl_sinks.builtin_prompts()
    p = tmp_path / "prompts.txt"
    p.write_bytes("\ufeffw1 w2 w3\n# a comment\n\n  w4 w5 w6  \n".encode("utf-8"))
    seen, real_scan = [], tl_sinks.scan
    monkeypatch.setattr(tl_sinks, "scan", lambda model, prompts, **kw: seen.append(prompts) or real_scan(model, prompts, **kw))
    assert main(["scan", "--model", str(tiny_llama_dir), "--prompts", str(p), "--no-progress", "--device", "cpu"]) == 0
    assert seen == [["w1 w2 w3", "w4 w5 w6"]]


def test_cli_refuses_bad_devices(tmp_path, no_model, monkeypatch, capsys):
    assert main(["scan", "--device", "banana"]) == 2
    _one_error_line(capsys.readouterr().err, "--device banana", "not a device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["report", "--device", "cuda", "--out", str(tmp_path / "r.html")]) == 2
    _one_error_line(capsys.readouterr().err, "--device cuda", "no cuda device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["scan", "--device", "cuda:3"]) == 2
    _one_error_line(capsys.readouterr().err, "--device cuda:3", "1 cuda device")


def _raiser(exc: BaseException):
    def f(*a, **k):
        raise exc

    return f


@pytest.mark.parametrize("exc,code", [
    (tl_sinks.ModelNotAvailableError("'x' is not cached\nand HF_HUB_OFFLINE is set"), 3),
    (ModelLoadError("model.safetensors: truncated\n(header says 3 MB, file has 1 MB)"), 3),
    (OSError("config.json: permission denied"), 3),
    (KeyboardInterrupt(), 130),
])
def test_cli_load_failures_are_one_line_with_exit_codes(exc, code, monkeypatch, capsys):
    monkeypatch.setattr(tl_sinks, "load_model", _raiser(exc))
    assert main(["scan", "--model", "x", "--no-progress"]) == code
    err = _one_error_line(capsys.readouterr().err)
    assert err == "tl-sinks: interrupted" if code == 130 else err.startswith("tl-sinks: error: --model x: ")


@pytest.mark.parametrize("cmd", ["scan", "report"])
@pytest.mark.parametrize("exc,code", [
    (ValueError("position 0 is not BOS in 3 prompts;\npass --no-require-bos"), 4),
    (NotImplementedError("no hook_z on this architecture"), 4),
    (KeyboardInterrupt(), 130),
])
def test_cli_analysis_failures_are_one_line_with_exit_codes(cmd, exc, code, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tl_sinks, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(tl_sinks, "scan", _raiser(exc))
    monkeypatch.setattr("tl_sinks.report.build_report", _raiser(exc))
    out = tmp_path / "r.html"
    args = [cmd, "--no-progress"] + (["--out", str(out)] if cmd == "report" else ["--json", str(out)])
    assert main(args) == code
    _one_error_line(capsys.readouterr().err, "interrupted" if code == 130 else "not BOS" if isinstance(exc, ValueError) else "hook_z")
    assert not out.exists()


def test_cli_help_documents_exit_codes():
    from tl_sinks import cli

    help_text = cli._parser().format_help()
    for line in ("0    success", "2    bad argument", "3    the model could not be loaded", "4    the analysis refused", "130  interrupted"):
        assert line in help_text and line.split(None, 1)[0] in cli.__doc__
