"""Cost of ``tl_sinks.scan`` against plain forward passes over the same tokens.

Each variant runs in its own subprocess so that peak memory (``ru_maxrss``, CPU) or
``torch.cuda.max_memory_allocated`` (GPU) is measured from a clean start:

* ``forward``: ``model(tokens, return_type=None)`` per batch, the physical floor;
* ``scan``: ``tl_sinks.scan`` (all four stages) over the same batches;
* ``run_with_cache``: the naive approach, ``run_with_cache`` of the hooks the stages read, per
  batch (the cache is dropped after each batch; statistics are not even computed).

Usage::

    python benchmarks/scan_overhead.py --model minilm --batch-size 8 --seq-len 128 --n-batches 8
    python benchmarks/scan_overhead.py --random gpt2-small --seq-len 256 --device cuda --dtype bfloat16

Writes ``benchmarks/results/scan_overhead_<name>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANDOM_CONFIGS = {
    # GPT-2 small's shape (random weights; hub weights are not needed to time it).
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2-tiny": dict(n_embd=256, n_layer=4, n_head=4, n_positions=512, vocab_size=5000),
}


def build_random(name: str, out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = GPT2Config(**RANDOM_CONFIGS[name], bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(args: argparse.Namespace) -> dict:
    import torch

    import tl_sinks
    from tl_sinks._compat import inspect_model

    dtype = getattr(torch, args.dtype)
    model = tl_sinks.load_model(args.model_path, device=args.device, dtype=dtype)
    info = inspect_model(model)
    g = torch.Generator().manual_seed(0)
    bos = info.first_token_id if info.first_token_id is not None else 0
    batches = []
    for _ in range(args.n_batches):
        t = torch.randint(5, min(info.d_vocab, 30000), (args.batch_size, args.seq_len), generator=g)
        t[:, 0] = bos
        batches.append(t.to(args.device))
    all_tokens = torch.cat(batches)
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    names = None
    if args.variant == "run_with_cache":
        from tl_sinks.aggregation import AggregationAccumulator
        from tl_sinks.disparity import DisparityAccumulator
        from tl_sinks.scan import STAGES  # noqa: F401 - same stages as scan
        from tl_sinks.sinks import SinkAccumulator
        from tl_sinks.super_neurons import SuperNeuronAccumulator

        accs = [SinkAccumulator(model, info), AggregationAccumulator(model, info), DisparityAccumulator(model, info)]
        if info.has_mlp:
            accs.append(SuperNeuronAccumulator(model, info))
        names = sorted({n for a in accs for n in a.hook_names()})

    def run_once() -> None:
        with torch.no_grad():
            if args.variant == "forward":
                for t in batches:
                    model(t, return_type=None)
            elif args.variant == "scan":
                tl_sinks.scan(model, all_tokens, batch_size=args.batch_size, progress=False)
            else:
                for t in batches:
                    _, cache = model.run_with_cache(t, names_filter=names, return_type=None)
                    del cache
        sync()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = _current_rss_kib()  # model and tokens loaded, nothing run yet
    run_once()  # warm-up (its peak counts: it is the same workload)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    n_tokens = args.batch_size * args.seq_len * args.n_batches
    return {
        "variant": args.variant,
        "median_s": statistics.median(times),
        "times_s": times,
        "tokens_per_s": n_tokens / statistics.median(times),
        "peak_mem_mib": peak,
        "peak_mem_kind": "cuda max_memory_allocated" if cuda else "peak RSS above the RSS after loading (MiB)",
        "n_tokens": n_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory, hub name or 'minilm'")
    src.add_argument("--random", choices=sorted(RANDOM_CONFIGS), help="random GPT-2-shaped model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="forward,scan,run_with_cache")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # child process
        print(json.dumps(worker(args)))
        return
    name = args.random or args.model or "minilm"
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_random(args.random, Path(tmp))) if args.random else name
        rows = []
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", v, "--model-path", path]
            for k in ("batch_size", "seq_len", "n_batches", "repeats", "device", "dtype"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {r["variant"]: r for r in rows}
    if "forward" in by:
        for r in rows:
            r["time_ratio_to_forward"] = r["median_s"] / by["forward"]["median_s"]
            fwd_mem = by["forward"]["peak_mem_mib"]
            r["mem_ratio_to_forward"] = r["peak_mem_mib"] / fwd_mem if fwd_mem > 0 else None
    import torch

    result = {
        "model": name,
        "settings": {k: getattr(args, k) for k in ("batch_size", "seq_len", "n_batches", "repeats", "device", "dtype")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "results": rows,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"scan_overhead_{name.replace('/', '_')}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'variant':16} {'median s':>9} {'tok/s':>10} {'x fwd':>6} {'peak MiB':>9} {'mem x fwd':>9}")
    for r in rows:
        mr = r.get("mem_ratio_to_forward")
        print(f"{r['variant']:16} {r['median_s']:9.3f} {r['tokens_per_s']:10.0f} {r.get('time_ratio_to_forward', float('nan')):6.2f} "
              f"{r['peak_mem_mib']:9.1f} {mr if mr is None else round(mr, 2)!s:>9}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
