"""Checkpoint files (written atomically by deepkd_det.io.atomic_save) and the RNG state of a run.

A checkpoint is written to a temporary file in the target directory, flushed to disk and
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so a killed run
leaves either the previous or the new file, never a half-written one.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

from deepkd_det.io import atomic_save

__all__ = ["atomic_save", "load_checkpoint", "get_rng_state", "set_rng_state"]


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint this trainer wrote; read weights-only (a checkpoint is untrusted input)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{path} is not a classification checkpoint (no 'model' entry)")
    return obj


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states in weights-only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
