"""Fixtures shared by every test folder."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small forwards on a shared 2-core machine run far faster single-threaded (no OpenMP waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
