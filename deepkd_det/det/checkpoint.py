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
  loaded into a model without the head are dropped, with a log line. The DiffKD modules
  (``diffkd.*``, training-only) are treated the same way: a model evaluated or fine-tuned
  without DiffKD never receives them.
Works for any model (a plain ``GeneralizedRCNN`` too).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from deepkd_det.core.io import atomic_write, load_weights_only

from .modeling.diffkd import DIFFKD_PREFIX
from .modeling.reviewkd import REVIEWKD_HEAD_PREFIX
from .modeling.teacher import check_teacher_state, teacher_state_from_checkpoint
from .modeling.weights import TEACHER_PREFIX, convert_student_keys

__all__ = ["DeepKDCheckpointer", "TRAINING_ONLY_PARTS"]

# Training-only parts of DeepKDRCNN: (attribute, state-dict prefix, name in messages).
TRAINING_ONLY_PARTS = (("reviewkd_head", REVIEWKD_HEAD_PREFIX, "ReviewKD head"),
                       ("diffkd", DIFFKD_PREFIX, "DiffKD modules"))

logger = logging.getLogger(__name__)


class DeepKDCheckpointer(DetectionCheckpointer):
    """Drop-in replacement of ``DetectionCheckpointer``: same constructor and API."""

    # ------------------------------------------------------------------ writing
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
        present = {}
        for attr, prefix, what in TRAINING_ONLY_PARTS:
            state = checkpoint["model"]
            in_model = getattr(self.model, attr, None) is not None
            in_file = [k for k in state if k.startswith(prefix)]
            present[prefix] = (in_model, bool(in_file), what)
            if in_file and not in_model:
                logger.info("Ignoring the %d %s tensors (%s*) of the checkpoint: this model has none",
                            len(in_file), what, prefix)
                checkpoint["model"] = {k: v for k, v in state.items() if not k.startswith(prefix)}
            if in_model and in_file:
                # Checked before loading, so that a refused file leaves the model untouched.
                partial = sorted(
                    k for k in self.model.state_dict()
                    if k.startswith(prefix) and k not in state and not k.endswith("num_batches_tracked")
                )
                if partial:
                    raise ValueError(
                        f"the checkpoint holds part of the {what} but lacks {len(partial)} of its keys: "
                        f"{partial[:10]}"
                    )
        incompatible = super()._load_model(checkpoint)
        for prefix, (in_model, in_file, what) in present.items():
            if in_model and not in_file:
                # Release files (teacher + ImageNet student) never hold these training-only parts:
                # they are trained from their initialisation, like the student's FPN and heads.
                missing = [k for k in incompatible.missing_keys if k.startswith(prefix)]
                logger.info("%s not in the checkpoint: its %d tensors keep their initialisation", what, len(missing))
                incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]
        if teacher is not None and not has_teacher_keys:
            # Loaded at build time from TEACHER.MODEL.WEIGHTS; not missing here.
            incompatible.missing_keys[:] = [
                k for k in incompatible.missing_keys if not k.startswith(TEACHER_PREFIX)
            ]
        return incompatible

