"""A DetectionCheckpointer whose files are written atomically and read weights-only.

fvcore writes ``model_XXXX.pth`` and then the ``last_checkpoint`` tag in place: a run killed
in the middle leaves a truncated file that the tag (or the next ``--resume``) points to. Here
every file goes to a temporary file in the same directory, is flushed to disk and then renamed
over the target with ``os.replace`` (atomic on POSIX), so a reader sees the old file or the new
one, never half of one. ``.pth`` files are untrusted input and are loaded with
``torch.load(weights_only=True)``; detectron2 model-zoo ``.pkl`` files are pickles and go
through detectron2's own loader (load only trusted ones, or convert them once with
``tools/make_kd_weights.py``).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from deepkd_det.io import atomic_write

__all__ = ["AtomicDetectionCheckpointer", "AtomicSaveMixin", "atomic_write", "trainer_checkpointer_class"]


class AtomicSaveMixin:
    """Atomic ``save`` / ``tag_last_checkpoint`` for any fvcore Checkpointer subclass."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a directory")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")


class AtomicDetectionCheckpointer(AtomicSaveMixin, DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic ``save``/``tag_last_checkpoint`` and weights-only
    loading of ``.pth`` files. Same constructor and API."""

    def _load_file(self, filename: str):
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)  # model-zoo pickles: trusted files only (see docs)
        try:
            loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(
                f"checkpoint {filename!r} holds Python objects other than tensors, so it is not loaded "
                "(weights_only=True). If it comes from a source you trust, convert it once into a "
                f"weights-only file (e.g. with tools/make_kd_weights.py). Details: {e}"
            ) from None
        if not isinstance(loaded, dict):
            raise RuntimeError(f"checkpoint {filename!r} is not a state dict (got {type(loaded).__name__})")
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded


def trainer_checkpointer_class():
    """The checkpointer the trainer uses: the model side's DeepKDCheckpointer (which knows the
    combined teacher/student weight files) with atomic saving, when it exists."""
    try:
        from deepkd_det.modeling.checkpoint import DeepKDCheckpointer
    except ImportError:
        return AtomicDetectionCheckpointer
    return type("AtomicDeepKDCheckpointer", (AtomicSaveMixin, DeepKDCheckpointer), {})
