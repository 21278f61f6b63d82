"""Command line.

* ``tl-sinks scan [--model NAME_OR_PATH] [--prompts FILE] [--json OUT]``: print the scan report;
  ``--json`` also writes the headline findings and provenance.
* ``tl-sinks report [--model NAME_OR_PATH] [--prompts FILE] [--out report.html]``: write one
  self-contained HTML report that renders offline.

Without ``--model`` both analyse the embedded default model (offline) on the built-in prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"tl-sinks: --prompts {path}: no such file")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"tl-sinks: --prompts {path}: the file has no non-empty lines")
    return prompts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tl-sinks", description="Measure why attention sinks form (tl_sinks).")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="scan a model for every stage of the attention-sink causal chain")
    s.add_argument("--model", default="default", help="local Hugging Face model directory, hub name, 'minilm', or 'default' "
                   "(tl_sinks' own trained decoder, shipped in the package; the default)")
    s.add_argument("--prompts", help="text file, one prompt per line (default: tl_sinks' built-in prompts)")
    s.add_argument("--json", dest="json_out", help="also write the findings as JSON to this path")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    s.add_argument("--eps", type=float, default=0.3, help="sink-rate threshold (Gu et al.: 0.3)")
    s.add_argument("--no-require-bos", action="store_true", help="analyse position 0 even if it is not BOS")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r = sub.add_parser("report", help="write one self-contained HTML report (renders offline)")
    r.add_argument("--model", default="default", help="local Hugging Face model directory, hub name, 'minilm', or 'default' "
                   "(tl_sinks' own trained decoder, shipped in the package; the default)")
    r.add_argument("--prompts", help="text file, one prompt per line (default: tl_sinks' built-in prompts)")
    r.add_argument("--out", default="tl_sinks_report.html", help="output HTML path (default: %(default)s)")
    r.add_argument("--no-trace", action="store_true", help="skip the intervention trace (faster)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--device", default=None)
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import tl_sinks  # imported late so `--help` is instant

    prompts = _read_prompts(args.prompts) if args.prompts else None
    if args.command == "report":
        from tl_sinks.report import write_report

        try:
            model = tl_sinks.load_model(args.model, device=args.device)
            path = write_report(model, args.out, prompts, trace=not args.no_trace, batch_size=args.batch_size, progress=not args.no_progress)
        except (tl_sinks.ModelNotAvailableError, ValueError, NotImplementedError) as e:
            print(f"tl-sinks: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser, no network needed")
        return 0
    try:
        model = tl_sinks.load_model(args.model, device=args.device)
        result = tl_sinks.scan(
            model,
            prompts,
            batch_size=args.batch_size,
            eps=args.eps,
            require_bos=not args.no_require_bos,
            progress=not args.no_progress,
        )
    except (tl_sinks.ModelNotAvailableError, ValueError, NotImplementedError) as e:
        print(f"tl-sinks: error: {e}", file=sys.stderr)
        return 2
    print(result.report())
    if args.json_out:
        payload = {"summary": result.summary(), "meta": result.meta, "skipped": result.skipped}
        Path(args.json_out).write_text(json.dumps(_jsonable(payload), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
