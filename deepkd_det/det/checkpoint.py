"""DeepKDCheckpointer: the one checkpointer of the detection side (training, evaluation, tools).

detectron2's ``DetectionCheckpointer`` with:
- atomic files: every checkpoint and the ``last_checkpoint`` tag go to a temporary file in the
  same directory, are flushed to disk and renamed over the target (``os.replace``), so a killed
  run leaves the old file or the new one, never half of one (deepkd_det/core/io.py);
- weights-only reads: ``.pth`` files through ``torch.load(weights_only=True)``; detectron2
  model-zoo ``.pkl`` files are pickles and go through detectron2's loader (load only trusted
  ones, or convert them once with ``tools/make_kd_weights.py``);
- combined release files: student backbone keys in an ImageNet layout (torchvision ResNet,
  torchvision or tonylins MobileNetV2, or detectron2 names under another prefix) are renamed to
  ``backbone.bottom_up.*``;
- a checkpoint that carries ``teacher.*`` keys must match the teacher exactly (missing,
  unexpected or mis-shaped teacher keys raise ``TeacherWeightsError`` with their names); a
  checkpoint without teacher keys leaves the teacher loaded at build time alone;
- the ReviewKD head (``reviewkd_head.*``, training-only) may be absent as a whole from a
  checkpoint (release files and plain detectors have none): it then keeps its initialisation,
  said in one log line; a partly present head is refused with the missing key names. Head keys
  loaded into a model without the head are dropped, with a log line.
Works for any model (a plain ``GeneralizedRCNN`` too).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from deepkd_det.core.io import atomic_write, load_weights_only

from .modeling.reviewkd import REVIEWKD_HEAD_PREFIX
from .modeling.teacher import check_teacher_state, teacher_state_from_checkpoint
from .modeling.weights import TEACHER_PREFIX, convert_student_keys

__all__ = ["DeepKDCheckpointer"]

logger = logging.getLogger(__name__)


class DeepKDCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of ``DetectionCheckpointer``: same constructor and API."""

    # Model keys with these prefixes are left out of saved files (the trainer sets ("teacher.",)
    # when the frozen teacher is read from its own file at every start).
    exclude_prefixes: tuple = ()

    # ------------------------------------------------------------------ writing
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = self.model.state_dict()
        if self.exclude_prefixes:
            state = {k: v for k, v in state.items() if not k.startswith(self.exclude_prefixes)}
        data = {"model": state}
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

    # ------------------------------------------------------------------ reading
    def _load_file(self, filename: str):
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)  # model-zoo pickles: trusted files only (see docs)
        try:
            loaded = load_weights_only(filename)
        except ValueError as e:
            raise RuntimeError(str(e)) from None
        if not isinstance(loaded, dict):
            raise RuntimeError(f"checkpoint {filename!r} is not a state dict (got {type(loaded).__name__})")
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _load_model(self, checkpoint):
        teacher = getattr(self.model, "teacher", None)
        state = checkpoint["model"]
        if not checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(state)
            state = convert_student_keys(state, self.model.state_dict().keys())
            checkpoint["model"] = state
        has_teacher_keys = any(k.startswith(TEACHER_PREFIX) for k in state)
        if teacher is not None and has_teacher_keys:
            check_teacher_state(teacher, teacher_state_from_checkpoint(state), "(checkpoint being loaded)")
        elif has_teacher_keys:
            # A combined file loaded into a model without teacher (KD.TYPE NONE): the teacher
            # part is not this model's business.
            checkpoint["model"] = {k: v for k, v in state.items() if not k.startswith(TEACHER_PREFIX)}
        state = checkpoint["model"]
        head_in_model = getattr(self.model, "reviewkd_head", None) is not None
        head_in_file = [k for k in state if k.startswith(REVIEWKD_HEAD_PREFIX)]
        if head_in_file and not head_in_model:
            logger.info(
                "Ignoring the %d ReviewKD head tensors (%s*) of the checkpoint: this model has no head",
                len(head_in_file), REVIEWKD_HEAD_PREFIX,
            )
            checkpoint["model"] = {k: v for k, v in state.items() if not k.startswith(REVIEWKD_HEAD_PREFIX)}
        if head_in_model and head_in_file:
            # Checked before loading, so that a refused file leaves the model untouched.
            partial = sorted(
                k for k in self.model.state_dict()
                if k.startswith(REVIEWKD_HEAD_PREFIX) and k not in state and not k.endswith("num_batches_tracked")
            )
            if partial:
                raise ValueError(
                    f"the checkpoint holds part of the ReviewKD head but lacks {len(partial)} of its keys: "
                    f"{partial[:10]}"
                )
        incompatible = super()._load_model(checkpoint)
        if head_in_model and not head_in_file:
            # Release files (teacher + ImageNet student) never hold the head: it is trained from
            # its initialisation, like the student's FPN and heads. Not reported as missing.
            head_missing = [k for k in incompatible.missing_keys if k.startswith(REVIEWKD_HEAD_PREFIX)]
            logger.info(
                "ReviewKD head not in the checkpoint: its %d tensors keep their initialisation", len(head_missing)
            )
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(REVIEWKD_HEAD_PREFIX)
            ]
        if teacher is not None and not has_teacher_keys:
            # Loaded at build time from TEACHER.MODEL.WEIGHTS; not missing here.
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(TEACHER_PREFIX)
            ]
        return incompatible

