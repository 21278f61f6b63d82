"""How many forward passes one ``tl-sinks report`` runs, and how often it prepares the prompts.

Counts, for :func:`tl_sinks.report.write_report` on the embedded default model and the built-in
prompts (trace included): the forward passes through block 0 (every pass of the model runs it
once; tl_sinks' own two-token probe passes of ``inspect_model`` count too), the prompt rows they
carry, divided by the number of prompts (passes over the corpus),
and the calls of ``tl_sinks._inputs.prepare_prompts`` (validation and tokenisation of a corpus).
The counters are attached from outside the library (a PyTorch forward pre-hook on block 0 and a
profile function that sees every Python call), so the same script measures any version of
tl_sinks: ``--tree DIR`` runs it against another checkout (e.g. one made with ``git worktree add``)
in a subprocess with ``PYTHONPATH=DIR``, so before and after come from one command.

Usage::

    python benchmarks/report_passes.py                       # this checkout
    python benchmarks/report_passes.py --tree /tmp/before    # another checkout too, side by side

Writes ``benchmarks/results/report_passes.json`` (each tree's counts, its git revision, the
command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def count() -> dict:
    """Run one report in this process and count (the library is whichever ``import`` finds)."""
    import torch

    import tl_sinks
    from tl_sinks import _inputs
    from tl_sinks.report import write_report
    from tl_sinks.scan import builtin_prompts

    model = tl_sinks.load_model("default")
    n_prompts = len(builtin_prompts())
    passes, rows = [0], [0]

    def on_block0(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        passes[0] += 1
        rows[0] += int(x.shape[0])

    handle = model.blocks[0].register_forward_pre_hook(on_block0, with_kwargs=True)
    target = _inputs.prepare_prompts.__code__
    prepared = [0]

    def profiler(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "call" and frame.f_code is target:
            prepared[0] += 1

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sys.setprofile(profiler)
        try:
            write_report(model, Path(tmp) / "report.html", progress=False)
        finally:
            sys.setprofile(None)
            handle.remove()
        seconds = time.perf_counter() - t0
    return {"tl_sinks": str(Path(tl_sinks.__file__).resolve().parent), "n_prompts": n_prompts,
            "forward_passes": passes[0], "rows": rows[0], "passes_over_corpus": rows[0] / n_prompts,
            "prepare_prompts_calls": prepared[0], "seconds_with_counters": round(seconds, 2)}


def revision(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_tree(tree: Path) -> dict:
    """``count()`` in a subprocess that imports tl_sinks from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(res["tl_sinks"]) != (tree / "tl_sinks").resolve():
        raise SystemExit(f"{tree}: the subprocess imported tl_sinks from {res['tl_sinks']}, not from the tree")
    return {**res, "tree": str(tree), "revision": revision(tree)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="another checkout to measure too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "report_passes.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(count()))
        return
    trees = [Path(t).resolve() for t in args.tree] + [HERE.parent]
    results = [run_tree(t) for t in trees]
    print(f"{'revision':<10} {'passes':>7} {'rows':>6} {'x corpus':>9} {'prepares':>9} {'seconds':>8}")
    for r in results:
        print(f"{r['revision']:<10} {r['forward_passes']:>7} {r['rows']:>6} {r['passes_over_corpus']:>9.1f} "
              f"{r['prepare_prompts_calls']:>9} {r['seconds_with_counters']:>8}")
    cmd = "python benchmarks/report_passes.py" + "".join(f" --tree {t}" for t in args.tree)
    Path(args.out).write_text(json.dumps({"command": cmd, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
