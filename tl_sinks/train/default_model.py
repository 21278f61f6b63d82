"""The default model shipped inside tl_sinks: its recipe, and its model card measured by scan.

``python -m tl_sinks.train.default_model train OUT_DIR`` trains it from scratch with
:data:`RECIPE` (about an hour on 2 CPU cores); ``install OUT_DIR/model`` copies the result into
the package (weights stored in fp16 to keep the wheel small; tl_sinks loads them in fp32); and
``card`` re-measures the shipped model with :func:`tl_sinks.scan` and rewrites ``MODEL_CARD.md``
and ``chain.json`` next to it. Every number in the card comes from that command.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tl_sinks._io import atomic_write, atomic_write_text
from tl_sinks.train.paths import DEFAULT_MODEL_DIR, default_model_path  # noqa: F401 (re-exported)
from tl_sinks.train.trainer import TrainConfig, sample_batch

# Recipe notes (measured on held-out 128-token windows, 2 CPU cores, see the model card):
# the first recipe (weight decay 0.1, 4000 steps) plateaued at a sink in half of layer 3's
# heads (sink rate 0.08) from step 2250 on; Gu et al. find weight decay the strongest lever
# (0.5 about doubles the sink), and sinks grow with optimisation steps, so this one doubles
# the steps and raises the weight decay; bf16 autocast halves the time per step on CPU.
RECIPE = TrainConfig(
    d_model=192,
    n_layers=6,
    n_heads=6,
    d_mlp=512,
    vocab_size=4096,
    seq_len=256,
    steps=8000,
    batch_size=16,
    lr=3e-3,
    warmup=200,
    weight_decay=0.5,
    seed=0,
    autocast="bfloat16",
    eval_every=500,
    checkpoint_every=500,
)

# The evaluation set of the card: held-out (validation) windows of the training corpus.
CARD_PROMPTS = {"n": 64, "seq_len": 128, "seed": 123}


def card_prompts(tokenizer: Any, val_ids: Any = None) -> torch.Tensor:
    """The card's evaluation windows: BOS + 127 tokens of held-out text, seeded."""
    if val_ids is None:
        import numpy as np

        val_ids = np.load(DEFAULT_MODEL_DIR / "val_sample.npy")
    gen = torch.Generator().manual_seed(CARD_PROMPTS["seed"])
    return sample_batch(val_ids, CARD_PROMPTS["n"], CARD_PROMPTS["seq_len"], tokenizer.bos_token_id, gen)


def install(model_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """Copy a trained model into the package (fp16 weights) with its training record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(model_dir)
    dest = DEFAULT_MODEL_DIR
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.to(torch.float16).save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    training = json.loads((src / "training.json").read_text())
    run = Path(run_dir) if run_dir is not None else src.parent
    if (run / "log.json").is_file():
        log = json.loads((run / "log.json").read_text())
        atomic_write_text(dest / "loss_curve.json", json.dumps({"train": log["train"][::10], "val": log["val"]}))
        training.setdefault("seconds", log.get("seconds"))
    atomic_write_text(dest / "training.json", json.dumps(training, indent=2))
    import numpy as np

    # A slice of the held-out token stream, so the card's prompts are reproducible offline.
    val = np.load(run / "data" / "val.npy")
    atomic_write(dest / "val_sample.npy", lambda f: np.save(f, val[:20000]))
    return dest


def _measure_set(model: Any, r: Any, *, trace_prompts: Any, source: str) -> dict[str, Any]:
    """One section of the card: a prompt set's scan ``r`` and the chain trace on ``trace_prompts``."""
    from tl_sinks.trace import trace_chain

    t = trace_chain(model, trace_prompts, batch_size=16, progress=False)
    sn = r.super_neurons.found
    return {
        "source": source,
        "summary": r.summary(),
        "sink_rate_by_layer": r.sinks.sink_rate_by_layer(0).values.tolist(),
        "mean_received_by_layer": r.sinks.values[:, :, 0].mean(1).tolist(),
        "var_ratio_by_layer": r.aggregation.layer_ratio().values.tolist(),
        "super_neurons": sn[["label", "max_value", "max_pos", "position_ratio", "down_kurtosis", "top_dims", "top1_share",
                             "top3_share", "fires_at_first", "channel_sparse", "role"]].to_dict("records"),
        "top_dims": r.disparity.top_dims().to_dict("records"),
        "massive_dims": r.disparity.massive_dims().to_dict("records"),
        "chain_links": t.links.to_dict("records"),
        "ablation_selection": t.meta["ablation_selection"],
        "ablated": t.meta["ablated"],
        "position_sweep_peak": t.peak_received().to_dict("records"),
        "position": t.pos,
    }


def measure_without_bos(model: Any, prompts: torch.Tensor, with_bos: Any) -> dict[str, Any]:
    """The same windows with BOS dropped: is the sink tied to the first position or to BOS?

    Under a causal mask with rotary positions, the first token of a window is first whatever it
    is; if the sink and the massive dim vanish without BOS, the model keys them to the BOS token
    itself rather than to the first position (the paper's value-aggregation mechanism).
    ``with_bos`` is the scan of ``prompts`` themselves.
    """
    import tl_sinks

    r = tl_sinks.scan(model, prompts[:, 1:], stages=["sinks", "disparity"], batch_size=16, progress=False, require_bos=False)
    dim = int(with_bos.summary()["massive_dim_pos0"])
    return {
        "source": f"the held-out windows without BOS (BOS + {CARD_PROMPTS['seq_len'] - 1} tokens -> the {CARD_PROMPTS['seq_len'] - 1} tokens)",
        "sink_rate_pos0": r.sinks.sink_rate(0),
        "mean_received_pos0": r.sinks.mean_received(0),
        "sink_rate_by_layer": r.sinks.sink_rate_by_layer(0).values.tolist(),
        "massive_dim": dim,
        "massive_dim_pos0_by_layer": r.disparity.first_mean_abs[:, dim].tolist(),
        "massive_dim_pos0_by_layer_with_bos": with_bos.disparity.first_mean_abs[:, dim].tolist(),
        "disparity_pos0_attn_in": r.summary()["disparity_pos0_attn_in"],
    }


def measure(path: str | None = None) -> dict[str, Any]:
    """Run the scan and the chain trace on the card's two prompt sets; return the card's numbers.

    Sink statistics depend on prompt length (the uniform baseline is about ``ln(T) / T``), so
    the card reports both the held-out 128-token corpus windows and the short built-in English
    prompts that the command line, the report and the tutorials use.
    """
    import tl_sinks

    model = tl_sinks.load_model(path or default_model_path(), device="cpu")
    held_out = card_prompts(model.tokenizer)
    builtin = tl_sinks.builtin_prompts()
    scanned = {name: tl_sinks.scan(model, p, batch_size=16, progress=False) for name, p in (("heldout", held_out), ("builtin", builtin))}
    return {
        "prompts": CARD_PROMPTS,
        "no_bos": measure_without_bos(model, held_out, scanned["heldout"]),
        "heldout": _measure_set(model, scanned["heldout"], trace_prompts=held_out[:32],
                                source=f"{CARD_PROMPTS['n']} held-out corpus windows (val_sample.npy, seed {CARD_PROMPTS['seed']}), BOS + {CARD_PROMPTS['seq_len'] - 1} tokens"),
        "builtin": _measure_set(model, scanned["builtin"], trace_prompts=builtin,
                                source=f"the {len(builtin)} built-in English prompts (tl_sinks.builtin_prompts(), what `tl-sinks scan` uses)"),
    }


def _fmt(x: Any, nd: int = 3) -> str:
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def _positions(rows: list[dict[str, Any]]) -> str:
    """``"position 3"`` or ``"positions 2-14"``: where a group of super neurons peaks."""
    lo, hi = min(n["max_pos"] for n in rows), max(n["max_pos"] for n in rows)
    return f"position {lo}" if lo == hi else f"positions {lo}-{hi}"


def _rows_kind(rows: list[dict[str, Any]]) -> str:
    """The down rows of a group, by the role's sparsity test, with their largest kurtosis and top-3 share."""
    n_sparse = sum(bool(n["channel_sparse"]) for n in rows)
    kind = ("dense down rows" if n_sparse == 0 else "channel-sparse down rows" if n_sparse == len(rows)
            else f"down rows ({n_sparse} channel-sparse)")
    return (f"{kind} (excess kurtosis at most {_fmt(max(n['down_kurtosis'] for n in rows))}, "
            f"top-3 share at most {_fmt(max(n['top3_share'] for n in rows), 2)})")


def _super_neuron_line(sn: list[dict[str, Any]]) -> str:
    """The card's super-neuron bullet: how many were found, and which of them are the chain's.

    Roles are :func:`tl_sinks.super_neurons.super_neuron_roles`' (``chain``: fires at the first
    token and has a channel-sparse down row); only the chain neurons are described one by one,
    because only they are links of the chain (and what ``trace_chain`` ablates).
    """
    if not sn:
        return "- **Super neurons**: none found."
    by_role = {role: [n for n in sn if n["role"] == role] for role in ("chain", "first_token", "other_position")}
    chain, first, other = by_role["chain"], by_role["first_token"], by_role["other_position"]
    parts = [f"{len(sn)} found", f"{len(chain)} in the chain (first token and channel-sparse down row)"
             + (": " + "; ".join(
                 f"{n['label']} peak {_fmt(n['max_value'])} at position {n['max_pos']}, down-row excess kurtosis "
                 f"{_fmt(n['down_kurtosis'])}, top-3 share {_fmt(n['top3_share'], 2)}, top dims {n['top_dims']} "
                 f"({_fmt(100 * n['top1_share'], 2)}% of its squared norm in the first)" for n in chain) if chain else "")]
    if first:
        parts.append(f"{len(first)} more {'fires' if len(first) == 1 else 'fire'} at the first token "
                     f"({', '.join(n['label'] for n in first)}) with " + _rows_kind(first))
    if other:
        verb = "peaks" if len(other) == 1 else "peak"
        parts.append(f"{'and' if first else 'the other'} {len(other)} ({', '.join(n['label'] for n in other)}) {verb} at "
                     f"{_positions(other)} with " + _rows_kind(other))
    return "- **Super neurons**: " + "; ".join(parts) + "."


def _ablated(m: dict[str, Any]) -> str:
    """Which super neurons the trace mean-ablated, as ``trace_chain`` chose them."""
    labels = ", ".join(m["ablated"])
    if m["ablation_selection"] == "chain":
        return f"the chain super neurons {labels} mean-ablated at position 0"
    if m["ablation_selection"] == "first_token":
        return f"no chain super neuron, so the first-token ones {labels} mean-ablated at position 0"
    return "no super neuron to ablate"


def _chain_lines(m: dict[str, Any]) -> list[str]:
    s = m["summary"]
    lines = [
        f"On {m['source']}:",
        "",
        f"- **Sink**: sink rate at position 0 {_fmt(s['sink_rate_pos0'])} (Gu et al., eps 0.3); mean attention to "
        f"position 0 {_fmt(s['mean_received_pos0'])} against {_fmt(s['uniform_pos0'])} uniform. Sink rate by layer: "
        + ", ".join(_fmt(v, 2) for v in m["sink_rate_by_layer"]) + ".",
        f"- **Value aggregation**: median over heads of var(first) / var(rest) = {_fmt(s['var_ratio_first_rest_median'])}; per layer "
        + ", ".join(_fmt(v, 2) for v in m["var_ratio_by_layer"]) + ".",
        _super_neuron_line(m["super_neurons"]),
        f"- **Dimension disparity**: at the first token, dim {s['massive_dim_pos0']} reaches {_fmt(s['massive_dim_value'])} "
        f"(layer {s['massive_dim_layer']}, {_fmt(s['massive_dim_ratio_to_median'])}x the token's median |x|); the paper's ratio "
        f"(top dim / mean of the others, after the attention norm, max over layers) is {_fmt(s['disparity_pos0_attn_in'])} at "
        f"position 0 against {_fmt(s['disparity_rest_attn_in'])} elsewhere. Sun et al.'s criterion (> 100 and > 1000x the median): "
        f"{s['sun_massive_dims_pos0'] or 'not met'}.",
        f"- **Trace** (`trace_chain`, {_ablated(m)}): "
        + "; ".join(f"{r['metric']}: {_fmt(r['baseline'])} -> {_fmt(r['intervened'])}" for r in m["chain_links"]) + ".",
        "",
        f"Sinks created at position {m['position']}: peak over layers of the attention it receives (no intervention, the "
        "self-only mask, deviation amplification and its control, plain scaling):",
        "",
        "| intervention | lambda | peak received | layer | sink rate there |",
        "|---|---|---|---|---|",
    ]
    for r in m["position_sweep_peak"]:
        lines.append(f"| {r['intervention']} | {_fmt(r['lam'])} | {_fmt(r['peak_received'])} | {r['peak_layer']} | {_fmt(r['peak_sink_rate'])} |")
    return lines + [""]


def _no_bos_lines(nb: dict[str, Any] | None) -> list[str]:
    if not nb:
        return []
    return [
        "### Is the sink tied to BOS or to the first position?",
        "",
        f"On {nb['source']}: sink rate at position 0 {_fmt(nb['sink_rate_pos0'])}, mean attention to it "
        f"{_fmt(nb['mean_received_pos0'])} (sink rate by layer " + ", ".join(_fmt(v, 2) for v in nb["sink_rate_by_layer"]) + "); "
        f"mean |x| of dim {nb['massive_dim']} at position 0 by layer: "
        + ", ".join(_fmt(v, 3) for v in nb["massive_dim_pos0_by_layer"]) + " (with BOS: "
        + ", ".join(_fmt(v, 3) for v in nb["massive_dim_pos0_by_layer_with_bos"]) + "). "
        "Without BOS the first token is still the only one that attends to itself alone (the paper's "
        "value-aggregation mechanism is intact), so a sink that disappears here is keyed to the BOS token's identity; "
        "then nothing suggests that the paper's position interventions (the table above) create a sink elsewhere.",
        "",
    ]


def write_card(numbers: dict[str, Any], dest: Path = DEFAULT_MODEL_DIR) -> Path:
    """Render ``MODEL_CARD.md`` from the training record and :func:`measure`'s numbers."""
    training = json.loads((dest / "training.json").read_text())
    cfg, corpus = training["config"], training["corpus"]
    lines = [
        "# tl_sinks default model",
        "",
        "A small Llama-style decoder trained from scratch by `tl_sinks.train` so that every tl_sinks",
        "entry point and tutorial has a real model with an attention sink to analyse offline.",
        "Every number below is measured by `python -m tl_sinks.train.default_model card`, which",
        "rewrites this file and `chain.json` from the shipped weights (a test re-measures them).",
        "",
        "## Model",
        f"- LlamaForCausalLM: {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} heads "
        f"(d_head {cfg['d_model'] // cfg['n_heads']}), gated MLP d_mlp {cfg['d_mlp']}, RMSNorm, rotary, "
        f"tied embeddings, context {cfg['seq_len']}; attention: {cfg['attention']}.",
        f"- Tokenizer: byte-level BPE, {cfg['vocab_size']} tokens, trained on the corpus; BOS `<s>` starts every sequence.",
        "- Weights stored in fp16 (loaded in fp32 by `tl_sinks.load_model`).",
        "",
        "## Data",
        f"- Docstrings of the Python standard library, `pydoc_data.topics` and installed packages: "
        f"{corpus['documents']} documents, {corpus['characters']:,} characters, SHA-256 `{corpus['sha256'][:16]}...`.",
        "- Sources: " + ", ".join(f"{x['name']} {x['version']}" for x in corpus["sources"]) + ".",
        f"- {corpus.get('train_tokens', 0):,} training tokens, {corpus.get('val_tokens', 0):,} validation tokens.",
        "",
        "## Training",
        f"- {training['steps']} steps x {cfg['batch_size']} sequences x {cfg['seq_len']} tokens = {training['tokens_seen']:,} tokens; "
        f"AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine to {cfg['min_lr_ratio']}x), weight decay {cfg['weight_decay']}, "
        f"betas ({cfg['beta1']}, {cfg['beta2']}), clip {cfg['grad_clip']}, seed {cfg['seed']}, CPU, "
        f"{'bf16 autocast with fp32 weights' if cfg.get('autocast') == 'bfloat16' else cfg.get('autocast') or 'fp32'}"
        + (f", {training['seconds'] / 60:.0f} minutes" if training.get("seconds") else "") + ".",
        f"- Final validation loss: {_fmt(training['final_val_loss'], 4)} (nats/token). Curve: `loss_curve.json`.",
        "- Reproduce: `python -m tl_sinks.train.default_model train runs/default`, then `install runs/default/model` and `card`.",
        "",
        "## The chain, measured",
        "",
        "### Held-out corpus windows",
        "",
        *_chain_lines(numbers["heldout"]),
        "### Short English prompts",
        "",
        *_chain_lines(numbers["builtin"]),
        *_no_bos_lines(numbers.get("no_bos")),
        "## Intended use",
        "Analysis of attention sinks with tl_sinks. It is a 3M-parameter model trained on docstrings: it is not a useful "
        "language model.",
    ]
    path = dest / "MODEL_CARD.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("out")
    i = sub.add_parser("install")
    i.add_argument("model_dir")
    c = sub.add_parser("card")
    c.add_argument("--path", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        from tl_sinks.train.trainer import train

        print(train(RECIPE, args.out))
    elif args.cmd == "install":
        print(install(args.model_dir))
    else:
        numbers = json.loads(json.dumps(measure(args.path), default=str))
        atomic_write_text(DEFAULT_MODEL_DIR / "chain.json", json.dumps(numbers, indent=2))
        print(write_card(numbers))
        for key in ("heldout", "builtin"):
            print(key, json.dumps(numbers[key]["summary"], indent=2))


if __name__ == "__main__":
    main()
