"""Convergence study: attention variants at equal compute, several seeds each.

For every (variant, seed) it trains the same small Llama on the same docstring corpus, then
measures the final validation loss, the first step at which the validation loss reaches the
baseline's final loss (mean over its seeds), the sink rate at position 0 and the dimension
disparity (the paper's top-over-rest ratio at the first token, after the attention norm) with
``tl_sinks.scan``. Step-time overhead is ``benchmarks/headnorm_overhead.py``'s job (runs in
parallel here would distort it).

Usage (about 6 minutes per run on 2 CPU cores with the defaults; use --device cuda on a GPU)::

    python benchmarks/convergence.py --out benchmarks/results/convergence --seeds 0 1 2
    python benchmarks/convergence.py --steps 600 --jobs 2 --threads 1   # two runs at a time on 2 cores

Writes ``<out>/convergence.json`` (all numbers, loss curves) and ``<out>/convergence.png``.
The paper reports (152M model, OpenWebText): validation loss 2.7812 baseline vs 2.7421 head-wise
RMSNorm, disparity 82.67 vs 33.74. This script says whether a small model agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("softmax", "headnorm", "gated", "sink_logit", "softmax1")


def small_config(variant: str, seed: int, steps: int, device: str, threads: int | None):
    from tl_sinks.train import TrainConfig

    return TrainConfig(
        d_model=128, n_layers=4, n_heads=8, d_mlp=384, vocab_size=4096, seq_len=128, steps=steps, batch_size=16,
        lr=3e-3, warmup=100, weight_decay=0.1, attention=variant, seed=seed, device=device, num_threads=threads,
        eval_every=max(steps // 15, 1), eval_batches=8, checkpoint_every=steps,
    )


def measure(model_dir: Path, data_dir: Path, cfg) -> dict:
    import torch

    import tl_sinks
    from tl_sinks.train.trainer import prepare_data, sample_batch

    data = prepare_data(cfg, data_dir, progress=False)
    model = tl_sinks.load_model(model_dir, device="cpu")
    prompts = sample_batch(data["val"], 32, 128, data["tokenizer"].bos_token_id, torch.Generator().manual_seed(123))
    r = tl_sinks.scan(model, prompts, batch_size=16, progress=False, stages=["sinks", "disparity", "aggregation"])
    return {
        "sink_rate_pos0": r.sinks.sink_rate(0),
        "mean_received_pos0": r.sinks.mean_received(0),
        "disparity_pos0": r.disparity.disparity(0),
        "disparity_pos0_resid": r.disparity.disparity(0, site="resid"),
        "var_ratio_median": float(r.aggregation.first_rest_ratio().values.median()),
    }


def run_one(variant: str, seed: int, args: argparse.Namespace, data_dir: Path) -> dict:
    """Train and measure one (variant, seed); runs in a worker process when ``--jobs`` > 1."""
    import torch

    from tl_sinks.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = small_config(variant, seed, args.steps, args.device, args.threads)
    run = Path(args.out) / f"{variant}_s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "data").exists():
        (run / "data").symlink_to(data_dir.resolve(), target_is_directory=True)
    t0 = time.perf_counter()
    model_dir = train(cfg, run, progress=False)
    log = json.loads((run / "log.json").read_text())
    r = {"variant": variant, "seed": seed, "seconds": time.perf_counter() - t0, "val": log["val"],
         "final_val": log["val"][-1][1], **measure(model_dir, data_dir, cfg)}
    print(f"{variant:10} seed {seed}: val {r['final_val']:.4f} sink {r['sink_rate_pos0']:.3f} "
          f"disparity {r['disparity_pos0']:.1f} ({r['seconds']:.0f} s)", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/convergence")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (use --threads 1 with it)")
    ap.add_argument("--data", default=None, help="shared data directory (built once)")
    args = ap.parse_args()
    from concurrent.futures import ProcessPoolExecutor

    from tl_sinks.train.trainer import prepare_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data) if args.data else out / "data"
    # Build the corpus and tokenizer once, before any worker could race to build it.
    prepare_data(small_config("softmax", 0, args.steps, args.device, args.threads), data_dir)
    todo = [(v, s) for v in args.variants for s in args.seeds]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            done = list(pool.map(run_one, *zip(*todo), [args] * len(todo), [data_dir] * len(todo)))
    else:
        done = [run_one(v, s, args, data_dir) for v, s in todo]
    runs = {f"{r['variant']}/{r['seed']}": r for r in done}
    base_final = statistics.mean(r["final_val"] for r in runs.values() if r["variant"] == "softmax") if any(
        r["variant"] == "softmax" for r in runs.values()) else None
    summary = {}
    for variant in args.variants:
        rs = [r for r in runs.values() if r["variant"] == variant]
        if not rs:
            continue
        reach = []
        for r in rs:
            hit = [s for s, v in r["val"] if base_final is not None and v <= base_final]
            reach.append(hit[0] if hit else None)
        summary[variant] = {
            "final_val_mean": statistics.mean(r["final_val"] for r in rs),
            "final_val_std": statistics.pstdev(r["final_val"] for r in rs),
            "steps_to_baseline_final": reach,
            "sink_rate_mean": statistics.mean(r["sink_rate_pos0"] for r in rs),
            "mean_received_pos0_mean": statistics.mean(r["mean_received_pos0"] for r in rs),
            "disparity_mean": statistics.mean(r["disparity_pos0"] for r in rs),
            "disparity_std": statistics.pstdev(r["disparity_pos0"] for r in rs),
            "var_ratio_median_mean": statistics.mean(r["var_ratio_median"] for r in rs),
        }
    result = {"settings": vars(args), "wall_seconds": time.perf_counter() - t0,
              "config": small_config("softmax", 0, args.steps, args.device, args.threads).to_dict(),
              "baseline_final_val": base_final, "summary": summary, "runs": runs,
              "paper": {"val_loss": {"softmax": 2.7812, "headnorm": 2.7421}, "disparity": {"softmax": 82.67, "headnorm": 33.74},
                        "setting": "152M model, OpenWebText"}}
    (out / "convergence.json").write_text(json.dumps(result, indent=2))
    _plot(runs, summary, out / "convergence.png")
    for k, v in summary.items():
        print(f"{k:10} val {v['final_val_mean']:.4f} +- {v['final_val_std']:.4f}  sink {v['sink_rate_mean']:.3f}  "
              f"disparity {v['disparity_mean']:.1f} +- {v['disparity_std']:.1f}  reach {v['steps_to_baseline_final']}")


def _plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, variant in enumerate(summary):
        for r in runs.values():
            if r["variant"] == variant:
                s, v = zip(*r["val"])
                a.plot(s, v, color=f"C{i}", alpha=0.7, label=variant if r["seed"] == min(x["seed"] for x in runs.values()) else None)
    a.set_xlabel("step")
    a.set_ylabel("validation loss")
    a.legend()
    names = list(summary)
    b.bar(names, [summary[n]["sink_rate_mean"] for n in names], label="sink rate (pos 0)")
    b2 = b.twinx()
    b2.plot(names, [summary[n]["disparity_mean"] for n in names], "ko-", label="disparity")
    b.set_ylabel("sink rate")
    b2.set_ylabel("dimension disparity (paper ratio)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
