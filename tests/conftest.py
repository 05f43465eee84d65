"""Suite-wide fixtures and hooks: tests marked ``cuda`` are skipped, with the reason, where no CUDA
GPU is present (tools/gpu_check.sh runs them on a GPU machine); ``one_thread`` for small CPU work.

The whole suite runs with a dummy top-level ``tools`` package on the path (this process and every
subprocess it starts), as detectron2's source-built wheel installs one into site-packages: our
``tools/`` folder is scripts, loaded by file path (tests/toolload.py), never ``import tools``.
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

SHADOW_TOOLS = tempfile.mkdtemp(prefix="deepkd-shadow-tools-")
os.makedirs(os.path.join(SHADOW_TOOLS, "tools"))
with open(os.path.join(SHADOW_TOOLS, "tools", "__init__.py"), "w") as f:
    f.write('"""A stand-in for the top-level tools package of detectron2\'s wheel (tests/conftest.py)."""\n')
sys.path.insert(0, SHADOW_TOOLS)  # ahead of everything: it wins over any other `tools` too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SHADOW_TOOLS, os.environ.get("PYTHONPATH")) if p)
atexit.register(shutil.rmtree, SHADOW_TOOLS, True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Small forwards on a shared 2-core machine run far faster single-threaded (no OpenMP waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
