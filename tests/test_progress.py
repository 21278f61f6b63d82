"""Progress bars in a Jupyter kernel without ipywidgets: text bars, and no "IProgress not found"."""

from __future__ import annotations

import subprocess
import sys

FAKE_KERNEL = """
import sys, types, warnings
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")  # what tqdm.auto looks for
import IPython
IPython.get_ipython = lambda: type("ZMQInteractiveShell", (), {})()
import tqdm.notebook
assert tqdm.notebook.IProgress is None, "ipywidgets is installed: this test needs it absent"
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
{body}
bad = [str(w.message) for w in seen if "IProgress" in str(w.message)]
assert not bad, bad
"""


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAKE_KERNEL.replace("{body}", body)], capture_output=True, text=True, timeout=120)


def test_the_fake_kernel_reproduces_the_warning():
    r = _run("    from tqdm.auto import tqdm")
    assert r.returncode != 0 and "IProgress not found" in r.stderr


def test_tl_sinks_bars_import_without_the_warning():
    r = _run("    import tqdm.std\n    from tl_sinks._progress import tqdm as bar\n    import tqdm.notebook\n    assert issubclass(bar, tqdm.std.tqdm) and not issubclass(bar, tqdm.notebook.tqdm)")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("    import tl_sinks.hooks, tl_sinks.patching, tl_sinks.report")
    assert r.returncode == 0, r.stderr[-2000:]
