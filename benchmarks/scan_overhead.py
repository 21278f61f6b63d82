"""Cost of ``tl_sinks.scan`` against plain forward passes over the same tokens, in one process.

Three variants over the same batches of random tokens (BOS first):

* ``forward``: ``model(tokens, return_type=None)`` per batch, the physical floor;
* ``scan``: ``tl_sinks.scan`` (all four stages) over the same batches;
* ``run_with_cache``: the naive approach, ``run_with_cache`` of the hooks the stages read, per
  batch (the cache is dropped after each batch; statistics are not even computed).

**Time**: the model is loaded once; after a warm-up of every variant, ``--repeats`` rounds each
run every variant once, in a rotated order (round r starts with variant r mod 3), so a slow
moment of a shared machine falls on all of them alike. Reported per variant: the median over
rounds of the wall time, and of the process CPU time (``time.process_time``, all threads),
which a busy machine disturbs less; ratios are medians of the per-round ratios to ``forward``.

**Memory**: the peak of tensor memory allocated during one run of the variant above what was
allocated when it started (the model, the tokens): on CUDA ``torch.cuda.max_memory_allocated``,
on the CPU the running sum of the allocations and frees the PyTorch profiler records
(``profile_memory=True``), measured in a separate, untimed run. This is what the variant itself
needs, in one process; ``--rss`` also runs each variant in a fresh subprocess and reports its
peak RSS above the RSS after loading (the method of earlier versions of this script).

**Allocator**: on Linux, glibc's malloc hands large freed blocks back to the kernel and maps
them afresh, so every forward pass takes tens of thousands of page faults (seen here: ~50,000 per
batch of 8 x 256 on the default model, about 30% of its time, varying from process to process).
That noise falls on both variants but dilutes and scatters the ratio. ``--allocator stable``
re-runs the script with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 4 GiB (glibc
keeps freed memory for reuse), which makes the forward pass faster and the ratio repeatable;
the JSON records the allocator and each variant's page faults.

Usage::

    python benchmarks/scan_overhead.py --model default --batch-size 8 --seq-len 256 --n-batches 4 --repeats 9
    python benchmarks/scan_overhead.py --model default --batch-size 8 --seq-len 256 --n-batches 4 --repeats 15 --allocator stable
    python benchmarks/scan_overhead.py --model minilm --batch-size 8 --seq-len 128 --n-batches 4 --repeats 9
    python benchmarks/scan_overhead.py --random gpt2-small --seq-len 1024 --batch-size 16 --device cuda --dtype bfloat16

Writes ``benchmarks/results/scan_overhead_<name>_<device>.json`` (settings, machine, every
timing, the command) and prints a table.
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
VARIANTS = ("forward", "scan", "run_with_cache")
STABLE_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}


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


class Workload:
    """The model, the batches and one callable per variant."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        import tl_sinks
        from tl_sinks._compat import inspect_model
        from tl_sinks.aggregation import AggregationAccumulator
        from tl_sinks.disparity import DisparityAccumulator
        from tl_sinks.sinks import SinkAccumulator
        from tl_sinks.super_neurons import SuperNeuronAccumulator

        self.torch, self.cuda = torch, args.device.startswith("cuda")
        self.model = tl_sinks.load_model(args.model_path, device=args.device, dtype=getattr(torch, args.dtype))
        info = inspect_model(self.model)
        g = torch.Generator().manual_seed(0)
        bos = info.first_token_id if info.first_token_id is not None else 0
        self.batches = []
        for _ in range(args.n_batches):
            t = torch.randint(5, min(info.d_vocab, 30000), (args.batch_size, args.seq_len), generator=g)
            t[:, 0] = bos
            self.batches.append(t.to(args.device))
        self.all_tokens = torch.cat(self.batches)
        self.batch_size = args.batch_size
        accs = [SinkAccumulator(self.model, info), AggregationAccumulator(self.model, info),
                DisparityAccumulator(self.model, info)]  # the hooks the scan reads
        if info.has_mlp:
            accs.append(SuperNeuronAccumulator(self.model, info))
        self.names = sorted({n for a in accs for n in a.hook_names()})
        self.scan = tl_sinks.scan

    def run(self, variant: str) -> None:
        torch, model = self.torch, self.model
        with torch.no_grad():
            if variant == "forward":
                for t in self.batches:
                    model(t, return_type=None)
            elif variant == "scan":
                self.scan(model, self.all_tokens, batch_size=self.batch_size, progress=False)
            else:
                for t in self.batches:
                    _, cache = model.run_with_cache(t, names_filter=self.names, return_type=None)
                    del cache
        if self.cuda:
            torch.cuda.synchronize()

    def peak_mib(self, variant: str) -> float:
        """Peak tensor memory allocated during one run, above what was allocated at its start."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.run(variant)
            return (torch.cuda.max_memory_allocated() - start) / 2**20
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.run(variant)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()
            peak = max(peak, live)
        return peak / 2**20


def measure(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(args)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    for v in variants:  # warm-up: first-call costs, allocator, caches
        w.run(v)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            w.run(v)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    peaks = {v: w.peak_mib(v) for v in variants}
    n_tokens = args.batch_size * args.seq_len * args.n_batches
    rows = []
    for v in variants:
        row = {
            "variant": v,
            "median_s": statistics.median(wall[v]),
            "median_cpu_s": statistics.median(cpu[v]),
            "times_s": wall[v],
            "cpu_times_s": cpu[v],
            "tokens_per_s": n_tokens / statistics.median(wall[v]),
            "median_page_faults": statistics.median(faults[v]),
            "peak_mem_mib": peaks[v],
            "peak_mem_kind": ("cuda max_memory_allocated above the start" if w.cuda else
                              "peak of tensor allocations above the start (PyTorch profiler memory events)"),
            "n_tokens": n_tokens,
        }
        if "forward" in wall:
            row["time_ratio_to_forward"] = statistics.median(a / b for a, b in zip(wall[v], wall["forward"]))
            row["cpu_ratio_to_forward"] = statistics.median(a / b for a, b in zip(cpu[v], cpu["forward"]))
            row["mem_ratio_to_forward"] = peaks[v] / peaks["forward"] if peaks["forward"] > 0 else None
        rows.append(row)
    return {"results": rows, "threads": torch.get_num_threads()}


def _current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_worker(args: argparse.Namespace) -> dict:
    """Child process: one warm-up and one run of ``args.rss_variant``; peak RSS above loading."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(args)
    base = _current_rss_kib()
    w.run(args.rss_variant)
    w.run(args.rss_variant)
    return {"variant": args.rss_variant,
            "peak_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def rss_in_subprocesses(args: argparse.Namespace, path: str) -> dict[str, float]:
    out = {}
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--rss-variant", v, "--model-path", path]
        for k in ("batch_size", "seq_len", "n_batches", "device", "dtype", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"variant {v} failed:\n{res.stderr[-3000:]}")
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory, hub name, 'default' or 'minilm'")
    src.add_argument("--random", choices=sorted(RANDOM_CONFIGS), help="random GPT-2-shaped model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rss", action="store_true", help="also peak RSS, each variant in a fresh subprocess")
    ap.add_argument("--allocator", choices=("default", "stable"), default="default",
                    help="stable: glibc keeps freed memory (no page-fault noise; see the module docstring)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rss-variant", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_variant:  # child process
        print(json.dumps(rss_worker(args)))
        return
    if args.allocator == "stable" and any(os.environ.get(k) != v for k, v in STABLE_ALLOCATOR.items()):
        # glibc reads these when the process starts: run the script again with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_ALLOCATOR})
    name = args.random or args.model or "minilm"
    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = str(build_random(args.random, Path(tmp))) if args.random else name
        measured = measure(args)
        rss = rss_in_subprocesses(args, args.model_path) if args.rss else None
    import torch

    rows = measured["results"]
    if rss:
        for r in rows:
            r["peak_rss_mib_subprocess"] = rss[r["variant"]]
            if rss.get("forward"):
                r["rss_ratio_to_forward"] = rss[r["variant"]] / rss["forward"]
    result = {
        "model": name,
        "settings": {k: getattr(args, k) for k in ("batch_size", "seq_len", "n_batches", "repeats", "device", "dtype")},
        "method": "one process, interleaved rounds (rotated order), medians; memory from a separate untimed run",
        "allocator": {"kind": args.allocator, **{k: os.environ.get(k) for k in STABLE_ALLOCATOR}},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": measured["threads"],
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "results": rows,
        "command": " ".join(["python", "benchmarks/scan_overhead.py", *sys.argv[1:]]),
    }
    suffix = "_stable" if args.allocator == "stable" else ""
    out = Path(args.out or Path(__file__).parent / "results"
               / f"scan_overhead_{name.replace('/', '_')}_{args.device}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'variant':16} {'wall s':>8} {'x fwd':>6} {'cpu s':>8} {'x fwd':>6} {'peak MiB':>9} {'x fwd':>6}")
    for r in rows:
        mr = r.get("mem_ratio_to_forward")
        print(f"{r['variant']:16} {r['median_s']:8.3f} {r.get('time_ratio_to_forward', float('nan')):6.3f} "
              f"{r['median_cpu_s']:8.3f} {r.get('cpu_ratio_to_forward', float('nan')):6.3f} "
              f"{r['peak_mem_mib']:9.1f} {'-' if mr is None else f'{mr:.2f}':>6}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
