"""The install README describes is the one CI runs, and it is pinned."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_setup() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0)).lower()


def test_ci_runs_readme_setup_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    section = ci.split("# --- README.md set-up commands, verbatim ---", 1)[1]
    assert [line for line in section.splitlines() if line.strip()] == _readme_setup()
    assert any("-c constraints.txt" in line for line in _readme_setup())


def test_constraints_pin_every_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert "==" in line, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(line)] = line.split("==", 1)[1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    missing = [r for r in wanted if _name(r) not in pins]
    assert not missing, f"constraints.txt lacks pins for {missing}"
    assert pins["torch"] == "2.13.0"


def test_drift_report(tmp_path):
    known = tmp_path / "known.txt"
    now = tmp_path / "now.txt"
    known.write_text("# c\ntransformers==5.23.0\ntorch==2.13.0\n", encoding="utf-8")
    now.write_text("transformers==5.24.0\ntorch==2.13.0+cpu\nnew_pkg==1.0\n", encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "drift.py"), str(known), str(now)], capture_output=True, text=True, check=True).stdout
    assert "transformers 5.23.0 -> 5.24.0" in out and "torch" not in out.split("not in")[0] and "new-pkg" in out
    same = subprocess.run([sys.executable, str(ROOT / ".ci" / "drift.py"), str(known), str(known)], capture_output=True, text=True, check=True).stdout
    assert "identical" in same
