"""Print the markdown tables of ``benchmarks/README.md`` from the JSON in ``benchmarks/results/``.

Usage::

    python benchmarks/table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def scan_rows() -> list[str]:
    rows = ["| model, tokens (threads, dtype, allocator) | forward | scan | `run_with_cache` | scan time / forward "
            "(median of per-round ratios; CPU time) | scan peak tensor memory / forward | command |",
            "|---|---|---|---|---|---|---|"]
    for f in sorted(RESULTS.glob("scan_overhead_*.json")):
        d = json.loads(f.read_text())
        r = {x["variant"]: x for x in d["results"]}
        s = d["settings"]
        fw, sc, rc = r.get("forward"), r.get("scan"), r.get("run_with_cache")
        if not (fw and sc):
            continue
        cache = f"{rc['median_s']:.2f} s, {rc['peak_mem_mib']:.0f} MiB" if rc else "-"
        ratio = sc.get("time_ratio_to_forward", sc["median_s"] / fw["median_s"])
        cpu = f" (CPU {sc['cpu_ratio_to_forward']:.2f}x)" if "cpu_ratio_to_forward" in sc else ""
        alloc = d.get("allocator", {}).get("kind", "default")
        rows.append(
            f"| {d['model']}, {s['n_batches']} x {s['batch_size']} x {s['seq_len']} ({d['machine'].get('threads')} threads, "
            f"{s['dtype']}, {alloc}) | {fw['median_s']:.2f} s, {fw['peak_mem_mib']:.0f} MiB "
            f"| {sc['median_s']:.2f} s, {sc['peak_mem_mib']:.0f} MiB | {cache} | **{ratio:.2f}x**{cpu} "
            f"| **{sc['peak_mem_mib'] / max(fw['peak_mem_mib'], 1e-9):.2f}x** | `{d.get('command', '')}` |")
    return rows


def report_pass_rows() -> list[str]:
    f = RESULTS / "report_passes.json"
    if not f.is_file():
        return []
    d = json.loads(f.read_text())
    rows = ["| tree | forward passes | prompt rows | passes over the corpus | prompt preparations | command |",
            "|---|---|---|---|---|---|"]
    for r in d["results"]:
        rows.append(f"| {r['revision']} | {r['forward_passes']} | {r['rows']} | {r['passes_over_corpus']:.1f} "
                    f"| {r['prepare_prompts_calls']} | `{d['command']}` |")
    return rows


def startup_rows() -> list[str]:
    f = RESULTS / "startup.json"
    if not f.is_file():
        return []
    d = json.loads(f.read_text())
    names = list(d["results"][0]["seconds"])
    rows = ["| tree | " + " | ".join(f"`{n}`" for n in names) + " | heavy modules `import tl_sinks` loads | command |",
            "|---" * (len(names) + 3) + "|"]
    for r in d["results"]:
        rows.append(f"| {r['revision']} | " + " | ".join(f"{r['seconds'][n]['median']:.2f} s" for n in names)
                    + f" | {', '.join(r['heavy']) or 'none'} | `{d['command']}` |")
    return rows


def patching_rows() -> list[str]:
    rows = ["| model, batch x seq | site | patches (unchanged, skipped) | transformer_lens | tl_sinks | speed-up "
            "| every patch computed | max abs diff | command |",
            "|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(RESULTS.glob("patching_speed_*.json")):
        d = json.loads(f.read_text())
        for r in d["results"]:
            every = (f"{r['tl_sinks_all_patches_s']:.2f} s, {r['speedup_all_patches']:.1f}x"
                     if "tl_sinks_all_patches_s" in r else "")
            rows.append(f"| {Path(d['model']).name}, {d['batch_size']} x {d['seq_len']} | {r['site']} "
                        f"| {r['n_patches']} ({r.get('n_unchanged_skipped', 0)}) "
                        f"| {r['transformer_lens_s']:.2f} s | {r['tl_sinks_s']:.2f} s | **{r['speedup']:.1f}x** | {every} "
                        f"| {r['max_abs_diff']:.1e} | `{d.get('command', '')}` |")
    return rows


def headnorm_rows() -> list[str]:
    rows = ["| recipe, device | variant | ms / step | overhead vs softmax | command |", "|---|---|---|---|---|"]
    for f in sorted(RESULTS.glob("headnorm_overhead_*.json")):
        d = json.loads(f.read_text())
        s = d["settings"]
        for r in d["results"]:
            ov = r["overhead_vs_softmax"]
            rows.append(f"| {s['recipe']}, {s['device']}{', ' + s['autocast'] if s.get('autocast') else ''} | {r['variant']} "
                        f"| {1e3 * r['median_step_s']:.1f} | {'' if ov is None else f'{100 * ov:+.1f}%'} | `{d.get('command', '')}` |")
    return rows


def convergence_rows() -> list[str]:
    f = RESULTS / "convergence" / "convergence.json"
    if not f.is_file():
        return []
    d = json.loads(f.read_text())
    rows = ["| variant | final val loss (mean +- sd over seeds) | steps to the baseline's final loss | sink rate (pos 0) | disparity (pos 0) | var ratio first/rest |",
            "|---|---|---|---|---|---|"]
    for v, s in d["summary"].items():
        rows.append(f"| {v} | {s['final_val_mean']:.4f} +- {s['final_val_std']:.4f} | {s['steps_to_baseline_final']} "
                    f"| {s['sink_rate_mean']:.3f} | {s['disparity_mean']:.1f} +- {s.get('disparity_std', 0):.1f} "
                    f"| {s.get('var_ratio_median_mean', float('nan')):.2f} |")
    return rows


if __name__ == "__main__":
    for title, rows in (("scan", scan_rows()), ("report passes", report_pass_rows()), ("start-up", startup_rows()),
                        ("patching", patching_rows()), ("head-wise RMSNorm step time", headnorm_rows()),
                        ("convergence", convergence_rows())):
        print(f"### {title}\n")
        print("\n".join(rows) + "\n")
