"""Head-wise RMSNorm against the softmax baseline at the default recipe (issue 16).

Trains every (variant, seed) with :data:`tl_sinks.train.default_model.RECIPE` (6 layers, d_model
192, 8000 steps), only ``attention``, ``seed``, ``autocast``, ``steps`` and ``device`` replaced,
so one seed draws the same training batches for every variant. Every ``--measure-every`` steps
(at a validation, through ``train(on_eval=...)``) it snapshots the model into
``<run>/snapshots/step_XXXXX`` and measures the snapshot, loaded with ``tl_sinks.load_model``,
with ``tl_sinks.scan`` on fixed held-out windows (the default model card's: 64 windows of BOS +
127 tokens of the run's validation stream, seed 123; ``--measure-prompts N`` takes the first
N): val loss, sink rate and mean attention at position 0, the paper's disparity ratio at
position 0, the median first/rest variance ratio of ``hook_z`` and the top super neuron.
Measured steps are kept in ``<run>/curve.json``; a resumed run never measures them again.

Usage (about 1 h per run on a CPU with bf16 matrix units, much less on a GPU)::

    python benchmarks/convergence_default.py                       # all 6 runs, resumable
    python benchmarks/convergence_default.py --stop-after 4000     # first half of every run
    python benchmarks/convergence_default.py --device cuda --jobs 1
    python benchmarks/convergence_default.py --report-only         # rebuild JSON/figure/table

Writes ``--json`` (default ``benchmarks/results/convergence_default_recipe.json``) and, next to
it, the ``.md`` table and the ``.png`` figure. Runs recorded there by earlier invocations are
merged with those in ``--out``, keyed by (variant, seed, config).

Verdict rules (:func:`verdicts`): every claim is "undetermined" unless softmax and headnorm
(the variants the claims compare) each have at least 3 complete seeds at the planned steps AND
the baseline formed a sink (mean sink rate >= 0.05; without a sink there is nothing for
head-wise RMSNorm to remove). Past that gate, each claim compares the two variants' per-seed
values by their ranges [min, max] over seeds: it "holds" when the ranges do not overlap in the
paper's direction, "does not hold" when they do not overlap in the opposite direction, and is
"undetermined" when they overlap (3 seeds cannot separate them). The per-seed values are
(a) final val loss (lower is the claim), (b) the first measured step whose val loss is at most
the baseline's mean final loss (a seed that never reaches it counts as later than any step),
(c) disparity at position 0, (d) sink rate at position 0, (e) |log(var ratio first/rest)|, the
distance of the first token's output variance ratio from parity (1) on a log scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMPARED = ("softmax", "headnorm")
MIN_SEEDS = 3
MIN_BASELINE_SINK_RATE = 0.05
MEASURE_STAGES = ["sinks", "aggregation", "super_neurons", "disparity"]
PAPER = {
    "setting": "152M model, OpenWebText (the paper)",
    "val_loss": {"softmax": 2.7812, "headnorm": 2.7421},
    "disparity": {"softmax": 82.67, "headnorm": 33.74},
}
# Config fields that may differ between the runs of one study (each run records them).
_PER_RUN_FIELDS = ("attention", "seed", "autocast", "device")


# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """One invocation's study: which runs, how they are trained, measured and reported.

    Attributes:
        variants, seeds: The runs, one per (variant, seed).
        steps: Planned training steps of every run.
        measure_every: Steps between measurements (a multiple of ``base.eval_every``); the
            last step is always measured.
        autocast: ``"auto"`` (bf16 only where native), ``"none"`` or ``"bfloat16"``.
        device, threads, jobs: Where and how many runs train at once (``threads`` per run).
        out: Directory of the run directories (checkpoints, snapshots, curves); outside git.
        json_path: The report's JSON; the ``.md`` table and ``.png`` figure go next to it.
        stop_after: Stop every run once it has this many steps (split across sittings).
        measure_prompts: Number of held-out windows measured (``None``: the card's 64).
        base: The recipe every run starts from (:data:`RECIPE`; tests pass a tiny one).
        command: The command line that reproduces the study.
    """

    variants: list[str] = field(default_factory=lambda: list(COMPARED))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None
    measure_every: int = 500
    autocast: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    jobs: int = 1
    out: Path = Path("runs/convergence_default")
    json_path: Path = Path("benchmarks/results/convergence_default_recipe.json")
    stop_after: int | None = None
    measure_prompts: int | None = None
    base: Any = None
    command: str = ""

    def __post_init__(self) -> None:
        if self.base is None:
            from tl_sinks.train.default_model import RECIPE

            self.base = RECIPE
        self.steps = self.steps or self.base.steps
        self.out, self.json_path = Path(self.out), Path(self.json_path)
        if self.measure_every < 1 or self.measure_every % self.base.eval_every:
            raise ValueError(f"--measure-every {self.measure_every} must be a multiple of the recipe's "
                             f"eval_every={self.base.eval_every} (measurements happen at validations)")


def resolve_autocast(choice: str, device: str) -> str | None:
    """The autocast a run uses: ``"auto"`` is bf16 only where it is native (CUDA or a bf16 CPU)."""
    if choice == "none":
        return None
    if choice == "bfloat16":
        return "bfloat16"
    import torch

    from tl_sinks.train.trainer import cpu_has_native_bf16

    kind = torch.device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return "bfloat16" if kind == "cpu" and cpu_has_native_bf16() is True else None


def run_config(plan: Plan, variant: str, seed: int, autocast: str | None) -> Any:
    """The recipe with this run's variant, seed, autocast, steps and device (threads stay out)."""
    return dataclasses.replace(plan.base, attention=variant, seed=seed, autocast=autocast, steps=plan.steps,
                               device=plan.device, num_threads=None)


def config_hash(config: dict[str, Any]) -> str:
    """Short digest of a config dict: names the run directory and keys the merge."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def recipe_key(config: dict[str, Any]) -> str:
    """Digest of the config without the per-run fields: runs of one study share it."""
    return config_hash({k: v for k, v in config.items() if k not in _PER_RUN_FIELDS})


def run_dir(plan: Plan, cfg: Any) -> Path:
    return plan.out / f"{cfg.attention}_s{cfg.seed}_{config_hash(cfg.to_dict())}"


# --------------------------------------------------------------------------- measurement
def measure_prompts(tokenizer: Any, val_ids: Any, seq_len: int, n: int | None = None) -> Any:
    """The card's held-out windows on a run's validation stream; the first ``n`` of them.

    As :func:`tl_sinks.train.default_model.card_prompts` (which draws from the first 20000
    validation tokens, ``val_sample.npy``); windows are cut to the model's ``seq_len`` when it
    is shorter than the card's 128 (tiny test models).
    """
    import numpy as np
    import torch

    from tl_sinks.train.default_model import CARD_PROMPTS, card_prompts
    from tl_sinks.train.trainer import sample_batch

    val = np.asarray(val_ids[:20000])
    if seq_len >= CARD_PROMPTS["seq_len"]:
        prompts = card_prompts(tokenizer, val)
    else:
        gen = torch.Generator().manual_seed(CARD_PROMPTS["seed"])
        prompts = sample_batch(val, CARD_PROMPTS["n"], seq_len, tokenizer.bos_token_id, gen)
    return prompts[: n or CARD_PROMPTS["n"]]


def top_super_neuron(r: Any) -> dict[str, Any] | None:
    """The scan summary's top super neuron (a chain one first, else the largest write norm)."""
    found = r.super_neurons.found
    if found.empty:
        return None
    chain = r.super_neurons.chain
    row = (chain if len(chain) else found).iloc[0]
    return {"name": str(row["label"]), "layer": int(row["layer"]), "neuron": int(row["neuron"]),
            "peak": float(row["max_value"]), "pos": int(row["max_pos"])}


def measure_snapshot(path: Path, prompts: Any, device: str) -> dict[str, Any]:
    """Load a snapshot with ``tl_sinks.load_model`` and measure it with ``tl_sinks.scan``."""
    import tl_sinks

    model = tl_sinks.load_model(path, device=device)
    r = tl_sinks.scan(model, prompts, stages=MEASURE_STAGES, batch_size=16, progress=False)
    return {
        "sink_rate": float(r.sinks.sink_rate(0)),
        "mean_received_pos0": float(r.sinks.mean_received(0)),
        "disparity_pos0": float(r.disparity.disparity(0)),
        "var_ratio_first_rest": float(r.aggregation.first_rest_ratio().values.median()),
        "top_super_neuron": top_super_neuron(r),
    }


def save_snapshot(model: Any, tokenizer: Any, dest: Path) -> Path:
    """``save_pretrained`` into a temporary directory, then rename it into place."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if dest.exists():  # left by a crash between this snapshot and its checkpoint
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def read_curve(run: Path) -> list[dict[str, Any]]:
    f = run / "curve.json"
    return json.loads(f.read_text())["curve"] if f.is_file() else []


class CurveRecorder:
    """The ``on_eval`` callback: snapshot, measure and record a step once, never again."""

    def __init__(self, run: Path, cfg: Any, tokenizer: Any, prompts: Any, measure_every: int) -> None:
        self.run, self.cfg, self.tokenizer, self.prompts = run, cfg, tokenizer, prompts
        self.measure_every = measure_every
        self.curve = read_curve(run)
        if not (run / "curve.json").is_file():
            self._write()  # an entry from the start, so a run is listed before its first measurement

    def _write(self) -> None:
        from tl_sinks._io import atomic_write_text

        atomic_write_text(self.run / "curve.json", json.dumps({"config": self.cfg.to_dict(), "curve": self.curve}, indent=1))

    def wants(self, step: int) -> bool:
        due = step % self.measure_every == 0 or step == self.cfg.steps
        return due and step not in {p["step"] for p in self.curve}

    def __call__(self, step: int, model: Any, val_loss: float) -> None:
        if not self.wants(step):
            return
        snap = save_snapshot(model, self.tokenizer, self.run / "snapshots" / f"step_{step:05d}")
        # Loading and scanning must not move the training's RNG streams (resume stays exact).
        with _preserved_rng():
            point = {"step": step, "val_loss": float(val_loss), **measure_snapshot(snap, self.prompts, self.cfg.device)}
        self.curve = sorted([p for p in self.curve if p["step"] != step] + [point], key=lambda p: p["step"])
        self._write()


class _preserved_rng:
    """Restore torch's, NumPy's and Python's global RNG states on exit."""

    def __enter__(self) -> None:
        import numpy as np
        import torch

        self.states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __exit__(self, *exc: Any) -> None:
        import numpy as np
        import torch

        torch.set_rng_state(self.states[0])
        np.random.set_state(self.states[1])
        random.setstate(self.states[2])
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


# --------------------------------------------------------------------------- runs
def prepare_shared_data(plan: Plan) -> Path:
    """Build the corpus and tokenizer once, before any worker could race to build it."""
    from tl_sinks.train.trainer import prepare_data

    data_dir = plan.out / "data"
    prepare_data(plan.base, data_dir, progress=False)
    return data_dir


def train_and_measure(plan: Plan, variant: str, seed: int, autocast: str | None) -> dict[str, Any]:
    """Train (or resume) one run with its curve recorder; returns its run entry."""
    import torch

    from tl_sinks.train.trainer import prepare_data, train

    if plan.threads:
        torch.set_num_threads(plan.threads)
    cfg = run_config(plan, variant, seed, autocast)
    run = run_dir(plan, cfg)
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        (run / "data").symlink_to((plan.out / "data").resolve(), target_is_directory=True)
    entry = run_entry(run)
    if entry is not None and entry["complete"]:
        return entry
    data = prepare_data(cfg, run / "data", progress=False)
    prompts = measure_prompts(data["tokenizer"], data["val"], cfg.seq_len, plan.measure_prompts)
    recorder = CurveRecorder(run, cfg, data["tokenizer"], prompts, plan.measure_every)
    t0 = time.perf_counter()
    train(cfg, run, progress=False, stop_after=plan.stop_after, on_eval=recorder)
    _record_sitting(run, time.perf_counter() - t0)
    entry = run_entry(run)
    print(f"{variant:9} seed {seed}: {entry['steps']}/{entry['steps_planned']} steps, val {entry['final_val_loss']}, "
          f"sink {entry['sink_rate']}, disparity {entry['disparity_pos0']} ({entry['seconds']:.0f} s)", flush=True)
    return entry


def _record_sitting(run: Path, seconds: float) -> None:
    """Append this sitting (machine, wall seconds of training and measuring) to ``run/sittings.json``.

    A run may be trained across sittings and machines; the trainer's own ``log.json`` counts
    only the last sitting's seconds (its checkpoints hold the log before the time is added).
    """
    from tl_sinks._io import atomic_write_text

    f = run / "sittings.json"
    sittings = json.loads(f.read_text()) if f.is_file() else []
    atomic_write_text(f, json.dumps(sittings + [machine_info() | {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds}], indent=1))


def run_entry(run: Path) -> dict[str, Any] | None:
    """A run directory's entry: progress, curve and the final metrics (last curve point)."""
    curve_file = run / "curve.json"
    if not curve_file.is_file():
        return None
    recorded = json.loads(curve_file.read_text())
    config, curve = recorded["config"], recorded["curve"]
    log = json.loads((run / "log.json").read_text()) if (run / "log.json").is_file() else {"train": []}
    sittings = json.loads((run / "sittings.json").read_text()) if (run / "sittings.json").is_file() else []
    steps = max([log["train"][-1][0]] if log["train"] else [0])
    last = curve[-1] if curve else {}
    complete = steps >= config["steps"] and bool(curve) and last["step"] == config["steps"]
    return {
        "variant": config["attention"], "seed": config["seed"], "steps": steps, "steps_planned": config["steps"],
        "complete": complete, "autocast": config.get("autocast"), "device": config.get("device"),
        "seconds": float(sum(x["seconds"] for x in sittings)), "config_hash": config_hash(config), "recipe_key": recipe_key(config),
        "final_step": last.get("step"), "final_val_loss": last.get("val_loss"), "sink_rate": last.get("sink_rate"),
        "mean_received_pos0": last.get("mean_received_pos0"), "disparity_pos0": last.get("disparity_pos0"),
        "var_ratio_first_rest": last.get("var_ratio_first_rest"), "top_super_neuron": last.get("top_super_neuron"),
        "sittings": sittings,
        "config": config, "curve": curve,
    }


def collect_runs(plan: Plan) -> list[dict[str, Any]]:
    """Every run in ``plan.out``, merged over the runs of the existing JSON (run dirs win)."""
    merged: dict[tuple, dict[str, Any]] = {}
    if plan.json_path.is_file():
        for r in json.loads(plan.json_path.read_text()).get("runs", []):
            merged[(r["variant"], r["seed"], r["config_hash"])] = r
    for run in sorted(plan.out.glob("*_s*_*")) if plan.out.is_dir() else []:
        entry = run_entry(run)
        if entry is not None:
            merged[(entry["variant"], entry["seed"], entry["config_hash"])] = entry
    return sorted(merged.values(), key=lambda r: (r["variant"], r["seed"], r["config_hash"]))


def run_all(plan: Plan) -> list[dict[str, Any]]:
    """Train and measure every planned run (``plan.jobs`` at a time, in spawned processes)."""
    autocast = resolve_autocast(plan.autocast, plan.device)
    prepare_shared_data(plan)
    todo = [(v, s) for v in plan.variants for s in plan.seeds]
    if plan.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Spawned, not forked: a parent that touched CUDA cannot fork workers that use it.
        with ProcessPoolExecutor(max_workers=plan.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(train_and_measure, *zip(*[(plan, v, s, autocast) for v, s in todo])))
    return [train_and_measure(plan, v, s, autocast) for v, s in todo]


# --------------------------------------------------------------------------- summary and verdicts
def planned_runs(plan: Plan, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of this study: the plan's recipe and steps, its variants and seeds."""
    key = recipe_key(run_config(plan, plan.variants[0], plan.seeds[0], None).to_dict())
    return [r for r in runs if r["recipe_key"] == key and r["variant"] in plan.variants and r["seed"] in plan.seeds]


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def steps_to_reach(curve: list[dict[str, Any]], target: float | None) -> int | None:
    """The first measured step whose val loss is at most ``target`` (``None``: never)."""
    if target is None:
        return None
    return next((p["step"] for p in curve if p["val_loss"] <= target), None)


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per variant over COMPLETE runs only: n, mean/std (population) of the final metrics."""
    complete = [r for r in runs if r["complete"]]
    base = [r["final_val_loss"] for r in complete if r["variant"] == "softmax"]
    target = statistics.mean(base) if base else None
    out: dict[str, Any] = {"baseline_final_val_mean": target}
    for variant in variants:
        rs = sorted((r for r in complete if r["variant"] == variant), key=lambda r: r["seed"])
        s = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
        for name, metric in (("final_val", "final_val_loss"), ("sink_rate", "sink_rate"),
                             ("disparity", "disparity_pos0"), ("var_ratio", "var_ratio_first_rest")):
            for k, v in _stats([r[metric] for r in rs]).items():
                s[f"{name}_{k}"] = v
            s[f"{name}_per_seed"] = [r[metric] for r in rs]
        s["steps_to_baseline_final"] = [steps_to_reach(r["curve"], target) for r in rs]
        out[variant] = s
    return out


def compare_ranges(ours: list[float], base: list[float]) -> tuple[str, str]:
    """``holds`` if every ``ours`` is below every ``base``, ``does not hold`` if above, else overlap."""
    if max(ours) < min(base):
        return "holds", f"headnorm range [{min(ours):.4g}, {max(ours):.4g}] lies below softmax's [{min(base):.4g}, {max(base):.4g}]"
    if min(ours) > max(base):
        return "does not hold", f"headnorm range [{min(ours):.4g}, {max(ours):.4g}] lies above softmax's [{min(base):.4g}, {max(base):.4g}]"
    return "undetermined", (f"seed ranges overlap (headnorm [{min(ours):.4g}, {max(ours):.4g}], softmax "
                            f"[{min(base):.4g}, {max(base):.4g}]): {len(ours)} vs {len(base)} seeds do not separate them")


def _claims(summary: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """Each claim's per-seed values (lower is the paper's direction) and the numbers to show."""
    h, s = summary.get("headnorm", {}), summary.get("softmax", {})
    never = steps + 1  # a seed that never reaches the baseline's loss is later than any step

    def reach(v: dict[str, Any]) -> list[float]:
        return [never if x is None else x for x in v.get("steps_to_baseline_final", [])]

    def dist(v: dict[str, Any]) -> list[float]:
        return [abs(math.log(x)) if x and x > 0 else math.inf for x in v.get("var_ratio_per_seed", [])]

    def pair(v: dict[str, Any], k: str) -> dict[str, Any]:
        return {"mean": v.get(f"{k}_mean"), "std": v.get(f"{k}_std")}

    return [
        {"id": "a", "claim": "lower final validation loss", "h": h.get("final_val_per_seed", []), "s": s.get("final_val_per_seed", []),
         "ours": {"softmax": pair(s, "final_val"), "headnorm": pair(h, "final_val")}, "paper": PAPER["val_loss"]},
        {"id": "b", "claim": "faster convergence (steps to the baseline's mean final loss)", "h": reach(h), "s": reach(s),
         "ours": {"softmax": s.get("steps_to_baseline_final"), "headnorm": h.get("steps_to_baseline_final")},
         "paper": "claimed (no number quoted here)"},
        {"id": "c", "claim": "less dimension disparity at the first token", "h": h.get("disparity_per_seed", []),
         "s": s.get("disparity_per_seed", []), "ours": {"softmax": pair(s, "disparity"), "headnorm": pair(h, "disparity")},
         "paper": PAPER["disparity"]},
        {"id": "d", "claim": "smaller or absent attention sink (sink rate at position 0)", "h": h.get("sink_rate_per_seed", []),
         "s": s.get("sink_rate_per_seed", []), "ours": {"softmax": pair(s, "sink_rate"), "headnorm": pair(h, "sink_rate")},
         "paper": "claimed (no number quoted here)"},
        {"id": "e", "claim": "statistical parity of the first token's output (var ratio first/rest near 1, |log ratio| smaller)",
         "h": dist(h), "s": dist(s), "ours": {"softmax": pair(s, "var_ratio"), "headnorm": pair(h, "var_ratio")},
         "paper": "claimed (no number quoted here)"},
    ]


def gate(summary: dict[str, Any]) -> str | None:
    """Why no claim can be judged yet, or ``None`` when they can."""
    short = [f"{v} has {summary.get(v, {}).get('n', 0)}" for v in COMPARED if summary.get(v, {}).get("n", 0) < MIN_SEEDS]
    if short:
        return f"needs >= {MIN_SEEDS} complete seeds at the planned steps for softmax and headnorm; " + ", ".join(short)
    sink = summary["softmax"]["sink_rate_mean"]
    if sink < MIN_BASELINE_SINK_RATE:
        return f"the baseline formed no sink (mean sink rate {sink:.3g} < {MIN_BASELINE_SINK_RATE}): nothing to remove"
    return None


def verdicts(summary: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """The claims (a)-(e), each ``{claim, ours, paper, verdict, reason}``; rules in the module docstring."""
    why_not = gate(summary)
    out = []
    for c in _claims(summary, steps):
        verdict, reason = ("undetermined", why_not) if why_not else compare_ranges(c["h"], c["s"])
        out.append({"id": c["id"], "claim": c["claim"], "ours": c["ours"], "paper": c["paper"], "verdict": verdict, "reason": reason})
    return out


# --------------------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
    import torch

    from tl_sinks.train.trainer import cpu_has_native_bf16

    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_bf16_native": cpu_has_native_bf16()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def build_report(plan: Plan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: runs, the reproducing command, recipe, machine, summary, verdicts."""
    study = planned_runs(plan, runs)
    summary = summarize(study, plan.variants)
    n_complete = sum(r["complete"] for r in study)
    return {
        "status": ("complete" if n_complete == len(plan.variants) * len(plan.seeds) else
                   f"INCOMPLETE: {n_complete} of {len(plan.variants) * len(plan.seeds)} planned runs complete; "
                   "incomplete runs are not in the summary and are no conclusions"),
        "command": plan.command,
        "recipe": run_config(plan, "softmax", 0, None).to_dict() | {"attention": None, "seed": None, "autocast": None},
        "plan": {"variants": plan.variants, "seeds": plan.seeds, "steps": plan.steps, "measure_every": plan.measure_every,
                 "autocast": plan.autocast, "measure_prompts": plan.measure_prompts,
                 "device": plan.device, "threads": plan.threads, "jobs": plan.jobs},
        "machine": machine_info(),
        "paper": PAPER,
        "verdict_rules": __doc__.split("Verdict rules")[1].strip(),
        "summary": summary,
        "verdicts": verdicts(summary, plan.steps),
        "runs": runs,
    }


def _fmt(x: Any, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def markdown_table(report: dict[str, Any]) -> str:
    """The results table (mean +- std over complete seeds) and the verdicts, side by side with the paper."""
    s, paper = report["summary"], report["paper"]
    lines = [f"Status: {report['status']}.", "",
             "| variant | complete seeds | final val loss | steps to baseline final | sink rate (pos 0) | disparity (pos 0) "
             "| var ratio first/rest | paper val loss | paper disparity |", "|---|---|---|---|---|---|---|---|---|"]
    for v in report["plan"]["variants"]:
        x = s[v]
        pm = lambda k: f"{_fmt(x[f'{k}_mean'])} +- {_fmt(x[f'{k}_std'], 2)}"  # noqa: E731
        lines.append(f"| {v} | {x['n']} | {pm('final_val')} | {x['steps_to_baseline_final']} | {pm('sink_rate')} | "
                     f"{pm('disparity')} | {pm('var_ratio')} | {paper['val_loss'].get(v, '-')} | {paper['disparity'].get(v, '-')} |")
    lines += ["", "| claim | ours | paper | verdict | reason |", "|---|---|---|---|---|"]
    for c in report["verdicts"]:
        cells = [f"({c['id']}) {c['claim']}", _pair_text(c["ours"]), _pair_text(c["paper"]), f"**{c['verdict']}**", c["reason"]]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines + ["", f"Command: `{report['command']}`", ""])


def _pair_text(x: Any) -> str:
    """``softmax 3.1 +- 0.02, headnorm 3.0 +- 0.01`` from a claim's ``ours`` or ``paper``."""
    if not isinstance(x, dict):
        return str(x)
    parts = []
    for v, y in x.items():
        if isinstance(y, dict):
            y = "-" if y["mean"] is None else f"{_fmt(y['mean'])} +- {_fmt(y['std'], 2)}"
        parts.append(f"{v} {_fmt(y, 5)}")
    return ", ".join(parts)


def _band(ax: Any, runs: list[dict[str, Any]], metric: str, color: str, label: str) -> None:
    """Mean over seeds with the min-max band, at every measured step any seed has."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for p in r["curve"]:
            if p.get(metric) is not None:
                by_step.setdefault(p["step"], []).append(p[metric])
    if not by_step:
        return
    steps = sorted(by_step)
    ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], ".-", color=color, label=label)
    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color=color, alpha=0.2)


def write_figure(report: dict[str, Any], plan: Plan, path: Path) -> Path:
    """Val loss, sink rate and disparity over steps: mean and min-max band over seeds per variant."""
    from matplotlib.figure import Figure

    study = planned_runs(plan, report["runs"])
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for i, variant in enumerate(plan.variants):
        rs = [r for r in study if r["variant"] == variant]
        for ax, metric in zip(axes, ("val_loss", "sink_rate", "disparity_pos0")):
            _band(ax, rs, metric, f"C{i}", f"{variant} ({sum(r['complete'] for r in rs)}/{len(plan.seeds)} complete)")
    if report["summary"]["baseline_final_val_mean"] is not None:
        axes[0].axhline(report["summary"]["baseline_final_val_mean"], color="gray", ls="--", lw=0.8,
                        label="softmax mean final (complete seeds)")
    for ax, name in zip(axes, ("validation loss", "sink rate (pos 0)", "disparity (pos 0, paper ratio)")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend()
    fig.suptitle("default recipe: mean and min-max over seeds" + ("" if report["status"] == "complete" else " (INCOMPLETE)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_outputs(plan: Plan, report: dict[str, Any]) -> str:
    """Write the JSON, the ``.md`` table and the ``.png`` figure; return the table."""
    from tl_sinks._io import atomic_write_text

    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.json_path, json.dumps(report, indent=1))
    table = markdown_table(report)
    atomic_write_text(plan.json_path.with_suffix(".md"), table)
    write_figure(report, plan, plan.json_path.with_suffix(".png"))
    return table


# --------------------------------------------------------------------------- command line
def reproducing_command(argv: list[str]) -> str:
    """The command line without the sitting-only options (``--stop-after``, ``--report-only``)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--stop-after":
            skip = True
            continue
        if a.startswith("--stop-after=") or a == "--report-only":
            continue
        kept.append(a)
    return shlex.join(["python", "benchmarks/convergence_default.py", *kept])


def parse_args(argv: list[str] | None = None) -> tuple[Plan, bool]:
    from tl_sinks.train.default_model import RECIPE
    from tl_sinks.train.modeling import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(COMPARED), choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=RECIPE.steps)
    ap.add_argument("--measure-every", type=int, default=500)
    ap.add_argument("--measure-prompts", type=int, default=None, help="first N of the card's 64 held-out windows")
    ap.add_argument("--autocast", choices=["auto", "none", "bfloat16"], default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (with --threads 1 on 2 cores)")
    ap.add_argument("--out", default="runs/convergence_default")
    ap.add_argument("--json", default="benchmarks/results/convergence_default_recipe.json")
    ap.add_argument("--stop-after", type=int, default=None, help="stop every run at this many steps (resume later)")
    ap.add_argument("--report-only", action="store_true", help="rebuild JSON, table and figure from the run dirs")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    plan = Plan(variants=a.variants, seeds=a.seeds, steps=a.steps, measure_every=a.measure_every, autocast=a.autocast,
                device=a.device, threads=a.threads, jobs=a.jobs, out=Path(a.out), json_path=Path(a.json),
                stop_after=a.stop_after, measure_prompts=a.measure_prompts, command=reproducing_command(argv))
    return plan, a.report_only


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or, with ``--report-only``, only report) the study; print the table."""
    plan, report_only = parse_args(argv)
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    t0 = time.perf_counter()
    if not report_only:
        run_all(plan)
    report = build_report(plan, collect_runs(plan))
    report["invocation_seconds"] = time.perf_counter() - t0
    print(write_outputs(plan, report))
    return report


if __name__ == "__main__":
    main()
