"""The random-number state of a process (python, numpy, torch, CUDA) as weights-only-loadable data.

Checkpoints of both trainers carry it, so that a resumed run draws the same numbers (data
augmentation, dropout, noise) as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["capture_rng_state", "preserve_rng_state", "restore_rng_state"]


def capture_rng_state() -> Dict[str, Any]:
    """This process's python / numpy / torch (and CUDA) RNG states, as weights-only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserve_rng_state():
    """Run a block (evaluation, say) without moving the training RNG streams."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
