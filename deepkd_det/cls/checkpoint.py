"""Checkpoint files (written atomically by deepkd_det.core.io.atomic_save) and the RNG state of a run.

A checkpoint is written to a temporary file in the target directory, flushed to disk and
renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so a killed run
leaves either the previous or the new file, never a half-written one.
"""

from __future__ import annotations

from typing import Any, Dict

from deepkd_det.core.io import atomic_save, load_weights_only

__all__ = ["atomic_save", "load_checkpoint"]


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint this trainer wrote; read weights-only (a checkpoint is untrusted input)."""
    obj = load_weights_only(path)
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{path} is not a classification checkpoint (no 'model' entry)")
    return obj
