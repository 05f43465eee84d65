"""Suite-wide fixtures and hooks: tests marked ``cuda`` are skipped, with the reason, where no CUDA
GPU is present (tools/gpu_check.sh runs them on a GPU machine); ``one_thread`` for small CPU work."""

import pytest
import torch


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
