"""Convergence study: attention variants at equal compute, several seeds each.

For every (variant, seed) it trains the same small Llama on the same docstring corpus, then
measures the final validation loss, the first step at which the validation loss reaches the
baseline's final loss, the sink rate at position 0 and the dimension disparity (the paper's
top-over-rest ratio at the first token, after the attention norm) with ``tl_sinks.scan``. It also
times training steps of each variant (step-time overhead against the baseline).

Usage (about 6 minutes per run on 2 CPU cores with the defaults; use --device cuda on a GPU)::

    python benchmarks/convergence.py --out benchmarks/results/convergence --seeds 0 1 2

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


def step_time(variant: str, device: str, threads: int | None, n: int = 20) -> float:
    """Median seconds per optimiser step of the small model (after warm-up)."""
    import torch
    from transformers import LlamaConfig

    from tl_sinks.train.modeling import build_variant
    from tl_sinks.train.trainer import _optimizer

    if threads:
        torch.set_num_threads(threads)
    cfg = small_config(variant, 0, 10, device, threads)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.seq_len,
                     tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = build_variant(hf, variant).to(device).train()
    opt = _optimizer(model, cfg)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
    times = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/convergence")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=None, help="shared data directory (built once)")
    args = ap.parse_args()
    from tl_sinks.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data) if args.data else out / "data"
    runs = {}
    for variant in args.variants:
        for seed in args.seeds:
            cfg = small_config(variant, seed, args.steps, args.device, args.threads)
            run = out / f"{variant}_s{seed}"
            run.mkdir(exist_ok=True)
            if not (run / "data").exists():
                data_dir.mkdir(parents=True, exist_ok=True)
                (run / "data").symlink_to(data_dir.resolve(), target_is_directory=True)
            t0 = time.perf_counter()
            model_dir = train(cfg, run, progress=False)
            log = json.loads((run / "log.json").read_text())
            runs[f"{variant}/{seed}"] = {"variant": variant, "seed": seed, "seconds": time.perf_counter() - t0,
                                         "val": log["val"], "final_val": log["val"][-1][1], **measure(model_dir, data_dir, cfg)}
            print(f"{variant:10} seed {seed}: val {runs[f'{variant}/{seed}']['final_val']:.4f} "
                  f"sink {runs[f'{variant}/{seed}']['sink_rate_pos0']:.3f} disparity {runs[f'{variant}/{seed}']['disparity_pos0']:.1f}", flush=True)
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
            "disparity_mean": statistics.mean(r["disparity_pos0"] for r in rs),
            "step_seconds": step_time(variant, args.device, args.threads),
        }
    if "softmax" in summary:
        for v in summary.values():
            v["step_time_overhead"] = v["step_seconds"] / summary["softmax"]["step_seconds"] - 1
    result = {"settings": vars(args), "config": small_config("softmax", 0, args.steps, args.device, args.threads).to_dict(),
              "summary": summary, "runs": runs}
    (out / "convergence.json").write_text(json.dumps(result, indent=2))
    _plot(runs, summary, out / "convergence.png")
    for k, v in summary.items():
        print(f"{k:10} val {v['final_val_mean']:.4f} +- {v['final_val_std']:.4f}  sink {v['sink_rate_mean']:.3f}  "
              f"disparity {v['disparity_mean']:.1f}  step x{1 + v.get('step_time_overhead', 0):.3f}  reach {v['steps_to_baseline_final']}")


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
