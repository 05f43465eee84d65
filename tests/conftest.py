"""Suite-wide: tests marked ``cuda`` are skipped, with the reason, where no CUDA GPU is present
(tools/gpu_check.sh runs them on a GPU machine)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
