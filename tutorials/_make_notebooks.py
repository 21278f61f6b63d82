"""Generates the tutorial notebooks (committed without outputs; CI executes them with nbmake).

Run ``python tutorials/_make_notebooks.py`` after editing the cells below.
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
SETUP = '''import os

import tl_sinks

# The embedded default model runs offline; set TL_SINKS_TUTORIAL_MODEL to "gpt2", a Llama
# directory, or any local Hugging Face checkpoint to run this notebook unchanged on it.
MODEL = os.environ.get("TL_SINKS_TUTORIAL_MODEL", "default")
model = tl_sinks.load_model(MODEL)
info = tl_sinks.inspect_model(model)
prompts = tl_sinks.builtin_prompts()
print(info.architecture, info.n_layers, "layers x", info.n_heads, "heads;", "causal" if info.causal else "bidirectional")'''


def nb(cells):
    n = nbf.v4.new_notebook()
    n.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return n


NOTEBOOKS = {
    "01_finding_sinks.ipynb": [
        "md:# 01 · Finding attention sinks\n\nHow much attention does each key position receive, per layer and head? "
        "The Gu et al. sink rate counts the heads whose mean attention to a key exceeds eps = 0.3.",
        SETUP,
        "scores = tl_sinks.compute_sink_scores(model, prompts)\n"
        "print(f\"sink rate at position 0: {scores.sink_rate(0):.2f}\")\n"
        "print(f\"mean attention to position 0: {scores.mean_received(0):.3f} (uniform: {float(scores.uniform[0]):.3f})\")\n"
        "scores.sink_rate_by_layer(0).to_frame()",
        "md:The whole `[layer, head_index, key_pos]` table is a tidy DataFrame; `top` lists the strongest sink heads.",
        "scores.top(8)",
        "md:A heatmap of the attention each head pays to position 0 (outlined: above eps):",
        "from tl_sinks.viz import plot_sink_heatmap\nplot_sink_heatmap(scores);",
        "md:Excluding each key's attention to itself changes little for position 0 over long prompts, "
        "but matters for short ones (Gu et al. include it):",
        "strict = tl_sinks.compute_sink_scores(model, prompts, exclude_self=True)\n"
        "print(f\"{scores.mean_received(0):.3f} with the diagonal, {strict.mean_received(0):.3f} without\")",
        "md:Sinks other than position 0 (delimiters, newlines) are found by token; an empty table means none passed the threshold.",
        "scores.detect_sinks(min_count=2)",
        "md:One prompt, interactively (renders offline: the circuitsvis bundle is inlined):",
        "import torch\nfrom tl_sinks.viz import show_attention\n"
        "tokens = model.to_tokens(prompts[0])\n"
        "_, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith('hook_pattern'))\n"
        "top = scores.top(6)\n"
        "pattern = torch.stack([cache[f'blocks.{l}.attn.hook_pattern'][0, h] for l, h in zip(top.layer, top.head_index)])\n"
        "show_attention(pattern, model.to_str_tokens(tokens[0]), head_names=[f'L{l}H{h}' for l, h in zip(top.layer, top.head_index)], causal=info.causal)",
    ],
    "02_value_aggregation.ipynb": [
        "md:# 02 · Value aggregation and the variance discrepancy\n\nUnder a causal mask the first token attends only "
        "to itself, so its attention output (`hook_z`) is a single value vector; a token at position t averages t + 1 "
        "of them. Averages of n independent vectors have about 1/n of the variance: the first token stands out.",
        SETUP,
        "agg = tl_sinks.compute_value_aggregation(model, prompts)\nagg.layer_ratio().to_frame()",
        "md:Per head, variance at position 0 over the mean variance elsewhere:",
        "agg.first_rest_ratio().top(10)",
        "md:By position, against what uniform averaging of i.i.d. values would give (dashed):",
        "from tl_sinks.viz import plot_value_aggregation\nplot_value_aggregation(agg);",
        "md:Head-wise RMSNorm, applied post hoc, normalises every head's output per position, so the first token no "
        "longer differs in scale (the RMS ratio becomes 1):",
        "from tl_sinks.interventions import HeadRMSNorm\n"
        "normed = tl_sinks.scan(model, prompts, stages=['aggregation'], interventions=[HeadRMSNorm(gain='ones', eps=0.0)], progress=False)\n"
        "print('RMS ratio first/rest before:', round(float(agg.first_rest_ratio(stat='rms').values.median()), 3),\n"
        "      'after:', round(float(normed.aggregation.first_rest_ratio(stat='rms').values.median()), 3))",
    ],
    "03_super_neurons_and_disparity.ipynb": [
        "md:# 03 · Super neurons and dimension disparity\n\nA few MLP neurons fire hugely on the first token; their "
        "down-projection rows are channel-sparse, so they write into a few residual dims, which become massive.",
        SETUP,
        "sn = tl_sinks.find_super_neurons(model, prompts)\n"
        "sn.found[['label', 'max_value', 'max_pos', 'str_token', 'position_ratio', 'down_kurtosis', 'top_dims', 'top1_share']]",
        "md:The paper's weight-only finder (largest up/gate rows) needs no data, but depends on weight processing:",
        "w = tl_sinks.find_super_neurons_by_weights(model, top_k=3)\nprint(w.meta['processing'])\nw.found.head(6)",
        "md:Massive activations: per layer, the first token's largest residual dim, its ratio to the token's median, "
        "and the paper's top-over-rest ratio:",
        "d = tl_sinks.compute_dimension_disparity(model, prompts)\nd.top_dims()",
        "from tl_sinks.viz import plot_massive_activations\nplot_massive_activations(d);",
        "md:Who writes the largest first-token dim? At position 0 of a pre-LN model the residual is exactly the sum of "
        "the embedding and every earlier attention and MLP output:",
        "best = d.top_dims().sort_values('first_mean_abs').iloc[-1]\n"
        "dim, layer = int(best['dim']), int(best['layer'])\n"
        "print(f'dim {dim} after block {layer}: written mostly by {d.writer(dim, layer)}')\n"
        "d.attribution(dim, layer)",
        "md:The link: the top super neuron's down-projection writes into that dim.",
        "if len(sn.found):\n    print('super neuron', sn.found.iloc[0]['label'], 'top dims', sn.found.iloc[0]['top_dims'], '; massive dim', dim)",
    ],
    "04_interventions_and_patching.ipynb": [
        "md:# 04 · Interventions and patching\n\nThe paper creates sinks at arbitrary positions: mask a token so it "
        "attends only to itself, or amplify the deviation of its attention output from the mean; plain scaling is the "
        "control, which the paper reports does not create one (Llama-2, Llama-3). Here they are measured on the model at "
        "hand, together with the first link of the chain: ablating the super neurons.",
        SETUP,
        "from tl_sinks.trace import trace_chain\n"
        "trace = trace_chain(model, prompts, lambdas=(1, 5, 10, 30), progress=False)\nprint(trace)",
        "from tl_sinks.viz import plot_intervention_sweep\nplot_intervention_sweep(trace);",
        "trace.links",
        "md:Whether the interventions create a sink depends on how the model finds its first token. Under a causal "
        "mask the first token is first whatever it is; if the model's sink survives without BOS, the sink comes from the "
        "first *position* (the paper's value-aggregation mechanism) and making position p look like a first position "
        "should make it a sink too. If the sink vanishes without BOS, the model keys it to the BOS token itself:",
        "ids = [model.to_tokens(p_)[0].tolist() for p_ in prompts]\n"
        "with_bos = tl_sinks.compute_sink_scores(model, ids, progress=False)\n"
        "without_bos = tl_sinks.compute_sink_scores(model, [t[1:] for t in ids], require_bos=False, progress=False)\n"
        "print(f'sink rate at position 0 with BOS {with_bos.sink_rate(0):.2f}, without {without_bos.sink_rate(0):.2f}')",
        "md:Interventions are declarative and removed on exit:",
        "from tl_sinks.interventions import SelfOnlyMask, intervene\nfrom tl_sinks.trace import attention_to\n"
        "p = trace.pos\nbase, _ = attention_to(model, prompts, p)\nmasked, _ = attention_to(model, prompts, p, interventions=[SelfOnlyMask(pos=p)])\n"
        "print('attention to position', p, 'per layer\\n  none:', [round(float(x), 3) for x in base], '\\n  mask:', [round(float(x), 3) for x in masked])",
        "md:Batched activation patching: many patches per forward pass, a per-prompt metric. Here the metric is the "
        "attention the last layer pays to position 0, and the corrupted run replaces the first content token.",
        "import torch\nfrom tl_sinks.patching import attention_to_metric, patch_sweep\n"
        "clean = model.to_tokens(prompts[:4], padding_side='right')[:, :12]\n"
        "corrupted = clean.clone(); corrupted[:, 1] = clean[:, 5]\n"
        "res = patch_sweep(model, corrupted, clean, attention_to_metric(0), site='resid_pre',\n"
        "                  metric_site=f'blocks.{info.n_layers - 1}.attn.hook_pattern')\n"
        "res.mean().to_frame().pivot(index='layer', columns='pos', values='metric').round(3)",
    ],
    "05_headnorm_and_training.ipynb": [
        "md:# 05 · Head-wise RMSNorm and training\n\n`tl_sinks.train` trains small Llama-style decoders from scratch on an "
        "offline corpus (Python docstrings), with attention variants: head-wise RMSNorm, gated attention, a sink logit, "
        "softmax-off-by-one. Here: a few steps of two tiny models, to show the workflow; "
        "`benchmarks/convergence.py` runs the real comparison.",
        "import tempfile\n\nimport tl_sinks\nfrom tl_sinks.train import TrainConfig, train\n\n"
        "tiny = dict(d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=320, seq_len=32, steps=20, batch_size=8,\n"
        "            warmup=5, packages=(), max_documents=300, eval_every=10, eval_batches=2, checkpoint_every=20)\n"
        "runs = {}\nfor variant in ('softmax', 'headnorm'):\n"
        "    out = tempfile.mkdtemp()\n    runs[variant] = train(TrainConfig(**tiny, attention=variant), out, progress=False)\n"
        "    print(variant, '->', runs[variant])",
        "import json\nfrom tl_sinks.viz import plot_training_curves\n"
        "logs = {v: json.loads((p.parent / 'log.json').read_text()) for v, p in runs.items()}\nplot_training_curves(logs, smooth=5);",
        "md:Both load like any Hugging Face checkpoint, and every hook works; for the head-norm model `hook_z` is the "
        "attention output before the norm.",
        "for v, path in runs.items():\n    m = tl_sinks.load_model(path)\n"
        "    r = tl_sinks.scan(m, ['Return the value of x.', 'def f(): pass'], progress=False)\n"
        "    print(v, 'sink rate', round(r.sinks.sink_rate(0), 3))",
        "md:The embedded default model's own training curve and card:",
        "import json\nfrom pathlib import Path\nfrom tl_sinks.train.default_model import DEFAULT_MODEL_DIR\n"
        "curve = json.loads((DEFAULT_MODEL_DIR / 'loss_curve.json').read_text())\n"
        "plot_training_curves({'default model': curve}, smooth=5);",
        "print((DEFAULT_MODEL_DIR / 'MODEL_CARD.md').read_text()[:2000])",
        "md:The convergence study (`python benchmarks/convergence.py`, several seeds per variant) leaves its numbers in "
        "`benchmarks/results/convergence/convergence.json` when run from a clone of the repository:",
        "import pandas as pd\n"
        "found = [p for p in (Path('..') / 'benchmarks/results/convergence/convergence.json', Path('benchmarks/results/convergence/convergence.json')) if p.is_file()]\n"
        "pd.DataFrame(json.loads(found[0].read_text())['summary']).T if found else 'not run here'",
    ],
}

if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbf.write(nb(cells), HERE / name)
        print("wrote", HERE / name)
