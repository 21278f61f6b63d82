"""Is the sink tied to BOS or to the first position? Train the default recipe without BOS.

The default model's sink and massive dim vanish when its prompts lose BOS (see its model card):
it keys them to the BOS token's identity. With rotary positions and a causal mask, a model that
never sees BOS can find the first position only through that position's value aggregation (the
paper's mechanism). This study trains :data:`tl_sinks.train.default_model.RECIPE` with
``bos_prob=0`` (shorter, by default), then measures on held-out windows without BOS:

* the chain (``scan``): sink rate and mean attention at position 0, value-aggregation ratio,
  super neurons, massive dims;
* the paper's interventions (``trace_chain``) at a middle position: does the self-only mask or
  deviation amplification create a sink there, and does plain scaling (the control) not?

The same measurements of the shipped default model (BOS) sit beside them in the JSON.

Usage (3000 steps: about an hour on 2 CPU cores; 8000 steps, the recipe's length: about two)::

    python benchmarks/bos_study.py --steps 3000 --out runs/no_bos
    python benchmarks/bos_study.py --steps 8000 --out runs/no_bos_8k --results benchmarks/results/bos_study_8000.json

Training resumes from ``--out``'s checkpoint when interrupted.

Writes ``benchmarks/results/bos_study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def chain(model, prompts, *, require_bos: bool, pos: int, lambdas) -> dict:
    import tl_sinks
    from tl_sinks.trace import trace_chain

    r = tl_sinks.scan(model, prompts, batch_size=16, progress=False, require_bos=require_bos)
    t = trace_chain(model, prompts[:32], pos=pos, lambdas=lambdas, batch_size=16, progress=False, require_bos=require_bos)
    return {
        "summary": r.summary(),
        "sink_rate_by_layer": r.sinks.sink_rate_by_layer(0).values.tolist(),
        "links": t.links.to_dict("records"),
        "peak_received_at_pos": t.peak_received().to_dict("records"),
        "pos": pos,
    }


def attention_by_layer(model, prompts, *, pos: int, lam: float) -> dict:
    """Per layer: attention received by position 0 untouched, and by ``pos`` untouched, under the
    self-only mask, under deviation amplification and under plain scaling (``lam``)."""
    from tl_sinks.interventions import AmplifyDeviation, ScaleOutput, SelfOnlyMask
    from tl_sinks.trace import attention_to

    def at(p, iv):
        rec, rate = attention_to(model, prompts, p, interventions=iv, require_bos=False, progress=False, batch_size=16)
        return [round(float(x), 4) for x in rec], [round(float(x), 3) for x in rate]

    out = {}
    out["recv_pos0_untouched"], out["rate_pos0_untouched"] = at(0, [])
    for name, iv in [("none", []), ("self_only_mask", [SelfOnlyMask(pos=pos)]),
                     (f"amplify_{lam:g}", [AmplifyDeviation(pos=pos, lam=lam)]), (f"scale_{lam:g}", [ScaleOutput(pos=pos, lam=lam)])]:
        out[f"recv_pos{pos}_{name}"], out[f"rate_pos{pos}_{name}"] = at(pos, iv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/no_bos")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--bos-prob", type=float, default=0.0)
    ap.add_argument("--pos", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=None, help="an existing data directory of the recipe's corpus (symlinked)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "bos_study.json"))
    args = ap.parse_args()
    import tl_sinks
    from tl_sinks.train import TrainConfig, train
    from tl_sinks.train.default_model import RECIPE, card_prompts

    cfg = TrainConfig.from_dict(RECIPE.to_dict() | {"bos_prob": args.bos_prob, "steps": args.steps, "num_threads": args.threads})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data and not (out / "data").exists():
        (out / "data").symlink_to(Path(args.data).resolve(), target_is_directory=True)
    model_dir = train(cfg, out)
    lambdas = (1, 5, 10, 30)
    trained = tl_sinks.load_model(model_dir, device="cpu")
    windows = card_prompts(trained.tokenizer)
    default = tl_sinks.load_model("default", device="cpu")
    result = {
        "command": "python benchmarks/bos_study.py " + " ".join(sys.argv[1:]),
        "config": cfg.to_dict(),
        "final_val_loss": json.loads((model_dir / "training.json").read_text())["final_val_loss"],
        "prompts": "the default model card's held-out windows, without BOS (127 tokens)",
        "no_bos_model": chain(trained, windows[:, 1:], require_bos=False, pos=args.pos, lambdas=lambdas),
        "no_bos_model_attention_by_layer": attention_by_layer(trained, windows[:, 1:], pos=args.pos, lam=30.0),
        "default_model_without_bos": chain(default, windows[:, 1:], require_bos=False, pos=args.pos, lambdas=lambdas),
        "default_model_with_bos": chain(default, windows, require_bos=True, pos=args.pos + 1, lambdas=lambdas),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2, default=str))
    for key in ("no_bos_model", "default_model_without_bos", "default_model_with_bos"):
        s = result[key]["summary"]
        print(f"{key:28} sink {s['sink_rate_pos0']:.3f} recv {s['mean_received_pos0']:.3f} "
              f"massive dim {s['massive_dim_pos0']} = {s['massive_dim_value']:.1f} ({s['massive_dim_ratio_to_median']:.0f}x median)")
        for r in result[key]["peak_received_at_pos"]:
            print(f"    {r['intervention']:18} lam {r['lam']:>4} peak received {r['peak_received']:.3f} (layer {r['peak_layer']})")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
