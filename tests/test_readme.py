"""README.md runs as written and quotes what the code prints.

* Every ```python block runs, in order, in one namespace, on the embedded default model, offline
  (in a temporary working directory: the training block writes ``runs/headnorm`` there).
* The numbers the "Quick start", "Interventions, tracing, patching" and "The embedded default
  model" sections quote are the ones the blocks compute (built-in prompts) or the model card
  measured (``chain.json``, held-out windows).
* Every ``tl-sinks`` command in the README parses; ``tl-sinks scan --model default --no-progress``
  runs and prints what ``print(result)`` printed in the quick start. The commands that take minutes
  (``tl-sinks report`` with its trace, ``tl-sinks scan --model minilm --json minilm.json``) run
  only with ``TL_SINKS_README_FULL=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tl_sinks.results import fmt_ratio

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FULL = os.environ.get("TL_SINKS_README_FULL") == "1"


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the first code line, code)`` for every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)]


def section(title: str) -> str:
    """The text of the ``## title...`` section, whitespace collapsed (so quotes may wrap)."""
    m = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", readme_text(), flags=re.M | re.S)
    assert m, f"README has no section '## {title}'"
    return " ".join(m.group(0).split())


def cli_commands(text: str) -> list[str]:
    """Every ``tl-sinks ...`` command: lines of ```bash blocks and inline code spans."""
    cmds = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        cmds += [line.strip() for line in block.splitlines() if line.strip().startswith("tl-sinks")]
    cmds += [c.strip() for c in re.findall(r"`(tl-sinks [^`]*)`", text)]
    return list(dict.fromkeys(cmds))


def assert_quoted(text: str, *quotes: str) -> None:
    missing = [q for q in quotes if q not in text]
    assert not missing, f"README does not quote {missing}"


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the README's Python blocks; returns their namespace, with their stdout under ``__stdout__``
    and their working directory under ``__cwd__``."""
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    cwd, work = os.getcwd(), tmp_path_factory.mktemp("readme")
    os.chdir(work)
    try:
        for line, code in python_blocks(readme_text()):
            # Padding with newlines makes tracebacks name the README's own line numbers.
            compiled = compile("\n" * (line - 1) + code, str(README), "exec")
            try:
                with contextlib.redirect_stdout(out):
                    exec(compiled, ns)
            except Exception as e:  # noqa: BLE001 - report which block failed
                raise AssertionError(f"the README's python block at line {line} failed: {type(e).__name__}: {e}") from e
    finally:
        os.chdir(cwd)
    ns["__stdout__"], ns["__cwd__"] = out.getvalue(), work
    return ns


def test_readme_has_the_blocks_and_commands():
    text = readme_text()
    assert len(python_blocks(text)) >= 3
    assert "tl-sinks scan --model minilm" in cli_commands(text)


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(readme):
    for name in ("model", "result", "ablated", "trace", "res", "model_dir"):
        assert name in readme, f"the README's blocks no longer define {name}"
    assert (readme["__cwd__"] / readme["model_dir"] / "config.json").is_file()
    assert "[sinks]" in readme["__stdout__"]


@pytest.mark.slow
def test_readme_quick_start_quotes_the_scan(readme):
    text = section("Quick start")
    r = readme["result"]
    s, agg, sn, d = r.sinks, r.aggregation, r.super_neurons, r.disparity
    ratio = agg.first_rest_ratio().values
    assert_quoted(
        text,
        f"sink rate {s.sink_rate(0):.3f} at position 0",
        f"mean attention to it {s.mean_received(0):.3f} against {float(s.uniform[0]):.3f} uniform",
        f"median {float(ratio.median()):.2f}",
        f"in {int((ratio < 1).sum())} of {ratio.numel()} heads",
    )
    chain = sn.chain
    assert list(chain["label"]) == ["L0N504", "L2N168"]
    assert_quoted(text, "two chain super neurons, L0N504 and L2N168")
    top = chain.iloc[0]
    assert_quoted(
        text,
        f"L0N504: {top['max_value']:.1f} at BOS, {fmt_ratio(top['position_ratio'])} its mean at positions >= 1",
        f"kurtosis {top['down_kurtosis']:.0f}, top dims {', '.join(map(str, top['top_dims']))}",
    )
    td = d.top_dims()
    best = td.loc[td["first_mean_abs"].idxmax()]
    assert_quoted(
        text,
        f"the largest first-token dim is {int(best['dim'])} (mean |x| {best['first_mean_abs']:.1f} after layer {int(best['layer'])}",
        f"{fmt_ratio(best['ratio_to_median'])} the token's median",  # as tl-sinks scan prints it
        f"the paper's ratio is {d.disparity(0):.1f} at position 0 against {d.disparity('rest'):.1f} elsewhere",
    )
    assert d.massive_dims().empty
    assert_quoted(text, "`massive_dims()` is empty there")


@pytest.mark.slow
def test_readme_intervention_and_patching_numbers(readme):
    text = section("Interventions, tracing, patching")
    assert readme["chain"] == ((0, 504), (2, 168))
    baseline = float(readme["trace"].links.set_index("metric").loc["sink rate at pos 0 (eps=0.3)", "baseline"])
    assert readme["ablated"].sinks.sink_rate(0) < 0.5 * baseline  # "the sink shrinks without them"
    res = readme["res"]
    assert readme["clean_tokens"].shape == readme["corrupted_tokens"].shape == (4, 14)
    assert_quoted(
        text,
        "logit differences of " + ", ".join(f"{float(x):.1f}" for x in res.clean) + " on the clean prompts",
        ", ".join(f"{float(x):.1f}" for x in res.corrupted) + " on the corrupted ones",
    )
    norm = res.normalized().values  # [layer, pos]
    assert_quoted(
        text,
        f"position 7: {float(norm[0, 7]):.2f} of the gap, patched before layer 0",
        f"position 12: {float(norm[0, 12]):.2f}",
        f"({float(norm[5, 13]):.2f}, patched before layer 5)",
    )
    others = [p for p in range(norm.shape[1]) if p not in (7, 12, 13)]
    assert float(norm[:, others].abs().max()) < 0.05  # "every other position restores nothing"
    assert float(norm[:, 7].max()) == pytest.approx(float(norm[0, 7]), abs=0.01)


def test_readme_bos_patching_numbers_match_tutorial_04():
    """The README quotes notebook 04's BOS sweep; its saved output holds the numbers."""
    nb = json.loads((ROOT / "tutorials/04_interventions_and_patching.ipynb").read_text(encoding="utf-8"))
    printed = "".join(
        "".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
    )
    m = re.search(r"attention of layer (\d+) to position 0, mean over prompts: clean ([\d.]+), corrupted ([\d.]+)", printed)
    assert m, "notebook 04 is not executed, or no longer prints the BOS sweep's baselines"
    layer, clean, corrupted = int(m.group(1)), float(m.group(2)), float(m.group(3))
    assert_quoted(section("Interventions, tracing, patching"),
                  f"layer {layer}'s attention to position 0 falls from {clean:.2f} to {corrupted:.2f}")


@pytest.mark.slow
def test_readme_default_model_section_quotes_scan_and_card(readme):
    text = section("The embedded default model")
    r = readme["result"]
    s, agg, sn, d = r.sinks, r.aggregation, r.super_neurons, r.disparity
    ratio = agg.first_rest_ratio().values
    by_layer = ", ".join(f"{100 * float(x):.0f}" for x in s.sink_rate_by_layer(0).values)
    top = sn.chain.iloc[0]
    assert_quoted(
        text,
        f"on the 48 built-in prompts, {100 * s.sink_rate(0):.0f}% of heads",
        f"(layers 0-5: {by_layer}%)",
        f"mean attention to it {s.mean_received(0):.3f} against {float(s.uniform[0]):.3f} uniform",
        f"L0N504: {top['position_ratio']:.0f}x its mean at positions >= 1 on the built-in prompts",
        f"{d.disparity(0):.1f} at BOS against {d.disparity('rest'):.1f} elsewhere on the built-in prompts",
        f"in {100 * float((ratio < 1).float().mean()):.0f}% of heads on the built-in prompts (median ratio {float(ratio.median()):.2f})",
    )
    from tl_sinks.train.default_model import DEFAULT_MODEL_DIR

    held = json.loads((DEFAULT_MODEL_DIR / "chain.json").read_text())["heldout"]
    h = held["summary"]
    assert_quoted(
        text,
        f"layer 3 ({100 * held['sink_rate_by_layer'][3]:.0f}% of its heads; {100 * h['sink_rate_pos0']:.0f}% of all heads)",
        f"{h['top_super_neuron_ratio']:.0f}x on the held-out windows",
        f"({h['disparity_rest_attn_in']:.1f} on the held-out windows",
        f"{100 * (1 - h['share_heads_var_first_gt_rest']):.0f}% on the held-out windows (median {h['var_ratio_first_rest_median']:.2f})",
        f"held-out sink rate {h['sink_rate_pos0']:.2f} -> 0",
    )


def _argv(cmd: str) -> list[str]:
    """A README command as argv for the CLI's parser: ``[--flag VALUE]`` synopsis brackets dropped."""
    return shlex.split(cmd.replace("[", "").replace("]", ""))[1:]


def test_readme_cli_commands_parse():
    from tl_sinks.cli import _parser

    cmds = cli_commands(readme_text())
    assert any(c.startswith("tl-sinks report") for c in cmds) and any(c.startswith("tl-sinks scan") for c in cmds)
    for cmd in cmds:
        try:
            _parser().parse_args(_argv(cmd))
        except SystemExit as e:
            if e.code == 0 and "--help" in _argv(cmd):  # argparse prints the help and exits 0
                continue
            pytest.fail(f"README command {cmd!r} does not parse (exit {e.code})")


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tl_sinks.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_readme_scan_command_prints_what_the_quick_start_prints(readme, tmp_path):
    p = _run_cli(["scan", "--model", "default", "--no-progress"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and p.stdout.strip() in readme["__stdout__"]
    # And the numbers the quick start quotes are among the printed ones.
    text = section("Quick start")
    for number in ("0.664", "0.425", "0.147", "0.42", "24.2", "196x", "47", "14.0", "72.2", "13.1"):
        assert number in p.stdout and number in text, number


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="minutes of CPU; set TL_SINKS_README_FULL=1 to run every README command")
def test_readme_every_concrete_command_runs(tmp_path):
    placeholders = ("PATH_OR_NAME", "FILE", "OUT", "path/to/", "[")
    for cmd in cli_commands(readme_text()):
        argv = _argv(cmd)
        if any(p in cmd for p in placeholders) or cmd.endswith("--model"):
            continue
        if "gpt2" in argv:
            import tl_sinks

            try:
                tl_sinks.load_model("gpt2")
            except Exception:  # noqa: BLE001 - not cached here (ModelNotAvailableError)
                continue
        p = _run_cli(argv + ["--no-progress"], tmp_path)
        assert p.returncode == 0, f"{cmd}: {p.stderr}"
    assert (tmp_path / "tl_sinks_report.html").is_file() and (tmp_path / "minilm.json").is_file()
