"""DeepKDCheckpointer: detectron2's checkpointer, made safe and layout-aware for DeepKD models.

- ``.pth`` files are read with ``torch.load(weights_only=True)`` (``.pkl`` through detectron2,
  trusted files only);
- student backbone keys of combined release files in an ImageNet layout (torchvision ResNet,
  torchvision or tonylins MobileNetV2, or detectron2 names under another prefix) are renamed to
  ``backbone.bottom_up.*``;
- a checkpoint that carries ``teacher.*`` keys must match the teacher exactly (missing,
  unexpected or mis-shaped teacher keys raise ``TeacherWeightsError`` with their names); a
  checkpoint without teacher keys leaves the teacher loaded at build time alone;
- the ReviewKD head (``reviewkd_head.*``, training-only) may be absent as a whole from a
  checkpoint (release files and plain detectors have none): it then keeps its initialisation,
  said in one log line; a partly present head is refused with the missing key names. Head keys
  loaded into a model without the head are dropped, with a log line.
"""

from __future__ import annotations

import logging

from detectron2.checkpoint import DetectionCheckpointer

from .reviewkd import REVIEWKD_HEAD_PREFIX
from .teacher import check_teacher_state, teacher_state_from_checkpoint
from .weights import TEACHER_PREFIX, convert_student_keys

__all__ = ["DeepKDCheckpointer"]

logger = logging.getLogger(__name__)


class DeepKDCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of ``DetectionCheckpointer`` for ``DeepKDRCNN`` (works for any model)."""

    def _load_file(self, filename):
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)  # pickles: trusted files only
        import torch

        with open(filename, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
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

