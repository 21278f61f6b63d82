"""Start-up cost of tl_sinks: ``import tl_sinks``, ``tl-sinks --help`` and a whole ``tl-sinks scan``.

Each command runs in a fresh Python process (``python -c ...``; the CLI as ``python -m
tl_sinks.cli``, which is what the ``tl-sinks`` entry point calls), so every run pays the full
start-up. ``--tree DIR`` measures another checkout too (e.g. one made with ``git worktree add``),
imported with ``PYTHONPATH=DIR``; rounds are interleaved, one run of every (tree, command) per
round in a rotated order, so a slow moment of a shared machine falls on all of them alike.
Reported: the median wall time over ``--repeats`` rounds, and which heavy modules the import
loaded (``torch``, ``pandas``, ``matplotlib``, ``circuitsvis``).

Usage::

    python benchmarks/startup.py --repeats 7
    python benchmarks/startup.py --repeats 7 --tree /tmp/before

Writes ``benchmarks/results/startup.json`` (every time, each tree's revision, the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAVY = ("torch", "pandas", "matplotlib", "circuitsvis", "transformers", "transformer_lens")
COMMANDS = {
    "import tl_sinks": [sys.executable, "-c", "import tl_sinks"],
    "tl-sinks --help": [sys.executable, "-m", "tl_sinks.cli", "--help"],
    "tl-sinks scan": [sys.executable, "-m", "tl_sinks.cli", "scan"],
}


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}


def loaded_by_import(tree: Path) -> dict:
    """Where ``import tl_sinks`` comes from in ``tree``, and which heavy modules it pulls in."""
    code = ("import sys, json, tl_sinks; print(json.dumps({'file': tl_sinks.__file__, "
            f"'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    out = subprocess.run([sys.executable, "-c", code], env=env_for(tree), cwd=tree, capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout)
    if Path(res["file"]).resolve().parent != (tree / "tl_sinks").resolve():
        raise SystemExit(f"{tree}: imported tl_sinks from {res['file']}, not from the tree")
    return res


def time_once(cmd: list[str], tree: Path) -> float:
    t0 = time.perf_counter()
    # In the tree: ``python -c`` and ``-m`` put the working directory first on sys.path.
    subprocess.run(cmd, env=env_for(tree), cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def revision(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="another checkout to measure too")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(HERE / "results" / "startup.json"))
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.tree] + [HERE.parent]
    jobs = [(t, name) for t in trees for name in COMMANDS]
    for t, name in jobs:  # warm-up: the page cache, .pyc files
        time_once(COMMANDS[name], t)
    times: dict[tuple[Path, str], list[float]] = {j: [] for j in jobs}
    for r in range(args.repeats):
        for j in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
            times[j].append(time_once(COMMANDS[j[1]], j[0]))
    results = []
    for t in trees:
        row = {"tree": str(t), "revision": revision(t), **loaded_by_import(t), "seconds": {}}
        for name in COMMANDS:
            row["seconds"][name] = {"median": round(statistics.median(times[(t, name)]), 3),
                                    "runs": [round(x, 3) for x in times[(t, name)]]}
        results.append(row)
    print(f"{'revision':<10}" + "".join(f"{n:>18}" for n in COMMANDS) + "  heavy modules on import")
    for row in results:
        print(f"{row['revision']:<10}" + "".join(f"{row['seconds'][n]['median']:>17.2f}s" for n in COMMANDS)
              + "  " + (", ".join(row["heavy"]) or "none"))
    cmd = f"python benchmarks/startup.py --repeats {args.repeats}" + "".join(f" --tree {t}" for t in args.tree)
    meta = {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"command": cmd, "machine": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
