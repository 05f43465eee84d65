"""DeepKDCheckpointer: detectron2's checkpointer, made safe and layout-aware for DeepKD models.

- ``.pth`` files are read with ``torch.load(weights_only=True)`` (``.pkl`` through detectron2,
  trusted files only);
- student backbone keys of combined release files in an ImageNet layout (torchvision ResNet,
  torchvision or tonylins MobileNetV2, or detectron2 names under another prefix) are renamed to
  ``backbone.bottom_up.*``;
- a checkpoint that carries ``teacher.*`` keys must match the teacher exactly (missing,
  unexpected or mis-shaped teacher keys raise ``TeacherWeightsError`` with their names); a
  checkpoint without teacher keys leaves the teacher loaded at build time alone.
"""

from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer

from .teacher import check_teacher_state, teacher_state_from_checkpoint
from .weights import TEACHER_PREFIX, convert_student_keys

__all__ = ["DeepKDCheckpointer"]


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
        incompatible = super()._load_model(checkpoint)
        if teacher is not None and not has_teacher_keys:
            # Loaded at build time from TEACHER.MODEL.WEIGHTS; not missing here.
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(TEACHER_PREFIX)
            ]
        return incompatible

