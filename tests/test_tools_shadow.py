"""The suite runs with another top-level ``tools`` package on the path (tests/conftest.py), as with
detectron2 built from source; the project's scripts still load and run."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHADOW_TOOLS
from tests.toolload import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_a_foreign_tools_package_wins_the_import_but_the_scripts_still_load():
    spec = importlib.util.find_spec("tools")
    assert spec.origin == os.path.join(SHADOW_TOOLS, "tools", "__init__.py")  # the shadow is real
    assert importlib.util.find_spec("tools.train_cls") is None  # `from tools import train_cls` fails
    assert load_tool("train_cls").__file__ == str(ROOT / "tools" / "train_cls.py")
    assert hasattr(load_tool("eval_cls"), "main") and hasattr(load_tool("plot_gsnr"), "main")


def test_subprocesses_see_the_foreign_package_and_the_scripts_run():
    code = "import tools, sys; print(tools.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == os.path.join(SHADOW_TOOLS, "tools", "__init__.py")
    for tool in ("train_cls", "eval_cls"):
        run = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"],
                             capture_output=True, text=True, cwd="/")
        assert run.returncode == 0 and "--cfg" in run.stdout, run.stderr
