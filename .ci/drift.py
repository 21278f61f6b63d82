"""Print which packages in a ``pip freeze`` differ from the known-good constraints file."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _pins(path: str) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2).split("+")[0]
    return out


def main(known: str, now: str) -> int:
    a, b = _pins(known), _pins(now)
    changed = sorted((n, a[n], b[n]) for n in a.keys() & b.keys() if a[n] != b[n])
    added = sorted(b.keys() - a.keys())
    if not changed and not added:
        print(f"versions: identical to {known}")
        return 0
    print(f"versions that differ from {known} ({len(changed)}):")
    for name, old, new in changed:
        print(f"  {name} {old} -> {new}")
    if added:
        print(f"not in {known}: {', '.join(added)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
