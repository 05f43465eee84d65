"""Import a script of ``tools/`` by its file path.

``tools/`` is a folder of scripts, not a package: ``import tools.x`` would find any top-level
``tools`` package elsewhere on the path first (detectron2's source-built wheel installs one into
site-packages), so tests load the scripts from their file instead (tests/conftest.py puts such a
package on the path for the whole suite to prove it).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@functools.cache
def load_tool(name: str):
    """The module ``tools/<name>.py``, executed once per test session."""
    spec = importlib.util.spec_from_file_location(f"deepkd_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
