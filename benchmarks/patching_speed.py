"""Batched patching (tl_sinks.patching.patch_sweep) against transformer_lens.patching.

A full layer x position sweep of ``hook_resid_pre`` (and optionally per-head ``hook_z``) on the
same clean/corrupted inputs, timing both and checking the numbers agree. The corrupted prompt
differs from the clean one in one token, in the middle: patches before it change nothing, and
``patch_sweep`` skips them (``skip_unchanged``). Both timings are recorded, with the skip and
without it (``tl_sinks_all_patches_s``: every patch computed), so each source of the speed-up is
visible.

Usage::

    python benchmarks/patching_speed.py --model minilm --batch-size 4 --seq-len 24
    python benchmarks/patching_speed.py --model tl_sinks/data/default_model --seq-len 32

Writes ``benchmarks/results/patching_speed_<model>_b<batch>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from transformer_lens import patching as tlp

    import tl_sinks
    from tl_sinks.patching import clear_self_checks, patch_sweep

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=24)
    ap.add_argument("--sites", default="resid_pre,z")
    ap.add_argument("--patches-per-forward", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = tl_sinks.load_model(args.model, device=args.device)
    info = tl_sinks.inspect_model(model)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(5, min(info.d_vocab, 20000), (args.batch_size, args.seq_len), generator=g)
    clean[:, 0] = info.first_token_id or 0
    corrupted = clean.clone()
    corrupted[:, args.seq_len // 2] = torch.randint(5, min(info.d_vocab, 20000), (args.batch_size,), generator=g)
    clean, corrupted = clean.to(args.device), corrupted.to(args.device)
    target = clean[:, -1]

    def metric(logits):  # per prompt: log-prob of the clean last token at the second-to-last position
        return torch.log_softmax(logits[:, -2].float(), -1).gather(-1, target[:, None].to(logits.device))[:, 0]

    tl_fns = {"resid_pre": tlp.get_act_patch_resid_pre, "z": tlp.get_act_patch_attn_head_out_by_pos}
    rows = []
    for site in args.sites.split(","):
        t0 = time.perf_counter()
        _, cache = model.run_with_cache(clean)
        ref = tl_fns[site](model, corrupted, cache, metric, reduce="none")
        ref = (ref.values if hasattr(ref, "values") else ref).float().cpu()
        t_tl = time.perf_counter() - t0
        clear_self_checks(model)
        t0 = time.perf_counter()  # the first sweep on this shape runs the shortcuts' self-check
        ours = patch_sweep(model, corrupted, clean, metric, site=site, patches_per_forward=args.patches_per_forward)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()  # a second sweep trusts the remembered verdict
        patch_sweep(model, corrupted, clean, metric, site=site, patches_per_forward=args.patches_per_forward)
        t_trusted = time.perf_counter() - t0
        t0 = time.perf_counter()
        every = patch_sweep(model, corrupted, clean, metric, site=site, patches_per_forward=args.patches_per_forward,
                            skip_unchanged=False)
        t_every = time.perf_counter() - t0
        diff = float(max((ours.values - ref).abs().max(), (every.values - ref).abs().max()))
        rows.append({"site": site, "n_patches": int(ours.meta["n_patches"]), "patches_per_forward": ours.meta["patches_per_forward"],
                     "n_unchanged_skipped": int(ours.meta["n_unchanged_skipped"]), "n_forwards": int(ours.meta["n_forwards"]),
                     "transformer_lens_s": t_tl, "tl_sinks_s": t_ours, "speedup": t_tl / t_ours,
                     "self_check_forwards": int(ours.meta["self_check"]["n_forwards"]),
                     "self_check_failed": ours.meta["self_check"]["failed"],
                     "tl_sinks_trusted_s": t_trusted, "speedup_trusted": t_tl / t_trusted,
                     "tl_sinks_all_patches_s": t_every, "speedup_all_patches": t_tl / t_every, "max_abs_diff": diff})
        print(f"{site:10} patches={rows[-1]['n_patches']:5d} (unchanged, skipped: {rows[-1]['n_unchanged_skipped']})  "
              f"transformer_lens {t_tl:7.2f} s  tl_sinks {t_ours:6.2f} s  speed-up {t_tl / t_ours:5.1f}x "
              f"(self-checked; trusted: {t_tl / t_trusted:5.1f}x)  "
              f"(every patch computed: {t_every:6.2f} s, {t_tl / t_every:5.1f}x)  max |diff| {diff:.2e}")
    result = {
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "device": args.device,
        "threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__, "results": rows,
        "command": "python benchmarks/patching_speed.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"patching_speed_{Path(args.model).name}_b{args.batch_size}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
