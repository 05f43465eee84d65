"""Run Python code in a fresh interpreter where ``import deepkd_det`` raises: what a deployer's
program sees (a plain torch / detectron2 / onnxruntime install without this project)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc, sys
class _NoDeepKD(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deepkd_det" or name.startswith("deepkd_det."):
            raise ImportError("deepkd_det is not installed in this process (" + name + ")")
        return None
sys.meta_path.insert(0, _NoDeepKD())
try:
    import deepkd_det  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker failed: deepkd_det was imported")
"""


def run_without_deepkd(code: str, *args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -c BLOCKER + code args...`` in ``cwd`` without the project on PYTHONPATH; raises
    AssertionError with the child's stderr when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER + code, *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def load_tool(name: str):
    """A module of tools/ by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
