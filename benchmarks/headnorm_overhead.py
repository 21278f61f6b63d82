"""Training-step time of each attention variant against the softmax baseline (target for
head-wise RMSNorm: at most 5% overhead).

Times full optimiser steps (forward, backward, AdamW) of the same Llama with each attention
variant, interleaving the variants round by round so that drift of the machine hits all of them
alike, and reports the median step time and its ratio to the baseline.

Usage::

    python benchmarks/headnorm_overhead.py                      # the convergence study's model
    python benchmarks/headnorm_overhead.py --recipe default     # the default model's recipe
    python benchmarks/headnorm_overhead.py --device cuda --autocast bfloat16

Writes ``benchmarks/results/headnorm_overhead_<recipe>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def build(variant: str, recipe: str, device: str):
    import torch
    from transformers import LlamaConfig

    from tl_sinks.train.modeling import build_variant, init_headnorm_from_first_token
    from tl_sinks.train.trainer import TrainConfig

    if recipe == "default":
        from tl_sinks.train.default_model import RECIPE

        cfg = TrainConfig.from_dict(RECIPE.to_dict() | {"attention": variant, "device": device})
    else:
        cfg = TrainConfig(d_model=128, n_layers=4, n_heads=8, d_mlp=384, vocab_size=4096, seq_len=128, batch_size=16,
                          attention=variant, device=device)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.seq_len,
                     tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = build_variant(hf, variant)
    if variant == "headnorm":
        init_headnorm_from_first_token(model)
    return cfg, model.to(device).train()


def main() -> None:
    import torch

    from tl_sinks.train.trainer import _optimizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["softmax", "headnorm", "gated", "sink_logit", "softmax1"])
    ap.add_argument("--recipe", choices=["small", "default"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", default=None, choices=[None, "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = {}
    for v in args.variants:
        cfg, model = build(v, args.recipe, args.device)
        x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=args.device)
        runs[v] = {"model": model, "opt": _optimizer(model, cfg), "x": x, "times": []}
    dtype = getattr(torch, args.autocast) if args.autocast else torch.float32

    def step(r) -> None:
        with torch.autocast(device_type=torch.device(args.device).type, dtype=dtype, enabled=args.autocast is not None):
            loss = r["model"](r["x"], labels=r["x"]).loss
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        r["opt"].step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for r in runs.values():  # warm-up
        for _ in range(3):
            step(r)
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                step(r)
            r["times"].append((time.perf_counter() - t0) / args.steps_per_round)
    base = statistics.median(runs["softmax"]["times"]) if "softmax" in runs else None
    rows = []
    for v, r in runs.items():
        med = statistics.median(r["times"])
        rows.append({"variant": v, "median_step_s": med, "times_s": r["times"],
                     "overhead_vs_softmax": (med / base - 1) if base else None})
        print(f"{v:10} {med * 1e3:8.1f} ms/step" + (f"  overhead {100 * (med / base - 1):+.1f}%" if base else ""))
    out = Path(args.out or Path(__file__).parent / "results" / f"headnorm_overhead_{args.recipe}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/headnorm_overhead.py " + " ".join(sys.argv[1:]),
        "settings": vars(args), "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                            "threads": torch.get_num_threads()}, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
