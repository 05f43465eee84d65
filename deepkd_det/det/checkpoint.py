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
- the teacher is detached while detectron2 loads the student, so nothing the student's file
  holds or lacks can touch it (detectron2's FrozenBN would reset absent statistics to 0 / 1). A
  checkpoint that carries ``teacher.*`` keys must match the teacher exactly (missing, unexpected
  or mis-shaped teacher keys raise ``TeacherWeightsError`` with their names) and, once the
  teacher is loaded, hold the same tensors (a different teacher is refused, naming where the
  loaded one came from); a random teacher (TEACHER.ALLOW_RANDOM_INIT) is loaded from it; teacher
  modules no part runs may be absent as a whole (the teacher's mask head; with
  ``model.teacher_needs``, the heads no part needs: a RetinaNet release file holds the teacher's
  backbone only), they keep their initialisation;
- the student backbone (``backbone.bottom_up.*``) must be filled completely: missing, unexpected
  or mis-shaped backbone keys, a teacher-only file, and ImageNet weights of the other kind
  (caffe2/MSRA vs torchvision, against INPUT.FORMAT, PIXEL_STD, RESNETS.STRIDE_IN_1X1) raise
  ``StudentWeightsError``; FPN and heads absent from an ImageNet file keep their initialisation;
- the release's ReviewKD head keys ``kd_trans.*`` are renamed to ``reviewkd_head.*``;
- the ReviewKD head (``reviewkd_head.*``, training-only) may be absent as a whole from a
  checkpoint (release files and plain detectors have none): it then keeps its initialisation,
  said in one log line; a partly present head is refused with the missing key names. Head keys
  loaded into a model without the head are dropped, with a log line. The DiffKD modules
  (``diffkd.*``, training-only) are treated the same way: a model evaluated or fine-tuned
  without DiffKD never receives them.
Works for any model (a plain ``GeneralizedRCNN`` too).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from deepkd_det.core.io import atomic_write, load_weights_only

from .modeling.reviewkd import release_head_keys_to_ours
from .modeling.teacher import (
    check_same_teacher,
    check_teacher_state,
    load_teacher_weights,
    teacher_state_from_checkpoint,
)
from .modeling.weights import (
    IMAGENET_INPUT,
    STUDENT_PREFIX,
    TEACHER_PREFIX,
    StudentWeightsError,
    absent_statistics_allowed,
    absent_teacher_modules,
    convert_student_keys,
    frozen_bn_statistics,
    imagenet_flavour,
)

__all__ = ["DeepKDCheckpointer", "EvalCheckpointer", "training_only_parts", "check_student_state"]



def training_only_parts():
    """(attribute, state-dict prefix, name in messages) of every training-only module a
    distillation part may own (derived from the parts: deepkd_det/det/distill/parts/)."""
    from deepkd_det.det.distill.parts.base import training_only_modules

    return tuple((attr, f"{attr}.", what) for attr, what in training_only_modules().items())

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

    def load(self, path: str, *args, **kwargs):
        self._loading = path  # named in the errors of _load_model
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        source = getattr(self, "_loading", None) or "(checkpoint being loaded)"
        teacher = getattr(self.model, "teacher", None)
        state = checkpoint["model"]
        if not checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(state)
            state = convert_student_keys(state, self.model.state_dict().keys())
            try:
                state = release_head_keys_to_ours(state)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        tstate = teacher_state_from_checkpoint(state) if any(k.startswith(TEACHER_PREFIX) for k in state) else {}
        state = {k: v for k, v in state.items() if not k.startswith(TEACHER_PREFIX)}
        if teacher is not None and tstate:
            tstate = _with_absent_teacher_modules(self.model, teacher, tstate, source)
            # Checked in full before anything is loaded, so a refused file leaves the model as it was.
            check_teacher_state(teacher, tstate, source)
            check_same_teacher(teacher, tstate, source)
        elif tstate:
            logger.info("Ignoring the %d teacher tensors of %s: this model has no teacher", len(tstate), source)

        present = {}
        for attr, prefix, what in training_only_parts():
            in_model = getattr(self.model, attr, None) is not None
            in_file = [k for k in state if k.startswith(prefix)]
            present[prefix] = (in_model, bool(in_file), what)
            if in_file and not in_model:
                logger.info("Ignoring the %d %s tensors (%s*) of the checkpoint: this model has none",
                            len(in_file), what, prefix)
                state = {k: v for k, v in state.items() if not k.startswith(prefix)}
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
        checkpoint["model"] = state
        with _teacher_detached(self.model) as student:
            if checkpoint.get("matching_heuristics", False):
                # Caffe2 / ImageNet files (e.g. detectron2's MSRA R-50.pkl): detectron2's name
                # matching, against the student only.
                self._convert_ndarray_to_tensor(state)
                checkpoint["model"] = state = align_and_update_state_dicts(
                    student.state_dict(), state, c2_conversion=checkpoint.get("__author__", None) == "Caffe2"
                )
                checkpoint["matching_heuristics"] = False
            check_student_state(student, state, source, had_teacher_keys=bool(tstate))
            # The teacher is out of the model while detectron2 loads: its tensors cannot be touched
            # (detectron2's FrozenBN would reset the running statistics a file lacks to 0 / 1).
            incompatible = super()._load_model(checkpoint)
        if teacher is not None and tstate and teacher.weights_source is None:
            # A teacher without weights yet (TEACHER.ALLOW_RANDOM_INIT): loaded from this file,
            # strictly (a loaded teacher equals the file already, checked above).
            load_teacher_weights(teacher, source, {TEACHER_PREFIX + k: v for k, v in tstate.items()},
                                 source_key="checkpoint")
        for prefix, (in_model, in_file, what) in present.items():
            if in_model and not in_file:
                # Release files (teacher + ImageNet student) never hold these training-only parts:
                # they are trained from their initialisation, like the student's FPN and heads.
                missing = [k for k in incompatible.missing_keys if k.startswith(prefix)]
                logger.info("%s not in the checkpoint: its %d tensors keep their initialisation", what, len(missing))
                incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]
        return incompatible


class EvalCheckpointer(DeepKDCheckpointer):
    """For evaluation and export, a checkpoint must fill the whole model: a skipped tensor (another
    class count, another architecture) would be evaluated at its random initialisation."""

    def _log_incompatible_keys(self, incompatible) -> None:
        problems = [
            f"{key}: checkpoint {tuple(shape_file)} vs model {tuple(shape_model)}"
            for key, shape_file, shape_model in incompatible.incorrect_shapes
        ]
        # (BN step counters play no part in inference; the parts' modules are training-only.)
        training_only = tuple(prefix for _, prefix, _ in training_only_parts())
        missing = [k for k in incompatible.missing_keys
                   if not k.startswith(training_only) and not k.endswith("num_batches_tracked")]
        if missing:
            problems.append(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
        if problems:
            hint = ""
            for key, shape_file, _ in incompatible.incorrect_shapes:
                if key.endswith("box_predictor.cls_score.weight"):
                    hint = (f" The checkpoint was trained for {shape_file[0] - 1} classes: set "
                            "MODEL.ROI_HEADS.NUM_CLASSES to that (and use a dataset with those classes).")
            raise ValueError("MODEL.WEIGHTS does not fit the model to evaluate: " + "; ".join(problems) + "." + hint)
        super()._log_incompatible_keys(incompatible)


def _with_absent_teacher_modules(model, teacher, tstate, source: str):
    """``tstate`` completed with the teacher's own tensors for the modules a combined file may
    leave out (``absent_teacher_modules``: mask / keypoint heads, which no part runs, and the heads
    none of the model's parts needs, ``model.teacher_needs`` when the model states it): release
    files of the Mask R-CNN pairs hold no teacher mask head, the RetinaNet pair's ``r50-rt101.pth``
    only ``teacher.backbone.*``. Those modules keep their initialisation and are never run."""
    own = teacher.state_dict()
    absent = absent_teacher_modules(own.keys(), tstate.keys(), getattr(model, "teacher_needs", None))
    if not absent:
        return tstate
    tstate = dict(tstate)
    for prefix, keys in absent.items():
        logger.info("%s holds no teacher %s* (%d tensors): no distillation part runs it, it keeps its "
                    "initialisation", source, prefix, len(keys))
        tstate.update({k: own[k] for k in keys})
    return tstate


@contextlib.contextmanager
def _teacher_detached(model):
    """``model`` without its ``teacher`` submodule for the duration (restored afterwards)."""
    teacher = model._modules.get("teacher")
    if teacher is None:
        yield model
        return
    del model._modules["teacher"]
    try:
        yield model
    finally:
        model._modules["teacher"] = teacher


def check_student_state(model, state, source: str, had_teacher_keys: bool = False) -> None:
    """Raise StudentWeightsError when ``state`` would leave part of the student backbone
    (``backbone.bottom_up.*``, the part ImageNet or a trained detector initialises) randomly
    initialised or mis-shaped: missing, unexpected or mis-shaped backbone keys (a file of another
    pair, e.g. R-18 weights for an R-50 student), or a file with teacher keys only. The FPN and
    the heads may be absent (an ImageNet-initialised student trains them from initialisation);
    a model without ``backbone.bottom_up`` (e.g. a C4 detector) is not checked here."""
    # BN step counters (``num_batches_tracked``) hold no weights: a BN file fits a FrozenBN model
    # and back, so they count on neither side.
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    backbone = [k for k in own if k.startswith(STUDENT_PREFIX)]
    if not backbone:
        return
    if not any(k in own for k in state):
        what = "only teacher.* keys" if had_teacher_keys else "no key of this model"
        raise StudentWeightsError(
            f"MODEL.WEIGHTS {source} holds {what}: the whole student (backbone included) would stay randomly "
            "initialised; use the combined teacher + ImageNet-student file of tools/make_kd_weights.py "
            "(or put a teacher-only file in TEACHER.MODEL.WEIGHTS)"
        )
    stats = frozen_bn_statistics(model)
    allowed = absent_statistics_allowed({k: w for k, w in stats.items() if k.startswith(STUDENT_PREFIX)}, state)
    missing = sorted(k for k in backbone if k not in state and k not in allowed)
    unexpected = sorted(k for k in state if k.startswith(STUDENT_PREFIX) and k not in own)
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in backbone
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} student backbone keys missing (would stay randomly initialised): "
                        f"{missing[:10]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected backbone keys: {unexpected[:10]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {shapes[:10]}")
    if problems:
        raise StudentWeightsError(
            f"MODEL.WEIGHTS {source} does not fit the student backbone (a file of another pair or student "
            "architecture?): " + "; ".join(problems)
        )
    imagenet_only = not any(k in own and not k.startswith(STUDENT_PREFIX) for k in state)
    flavour = imagenet_flavour(state) if imagenet_only else None
    if flavour is not None:
        wrong = _input_mismatches(model, flavour)
        if wrong:
            want = ", ".join(f"{k} {v}" for k, v in IMAGENET_INPUT[flavour].items())
            raise StudentWeightsError(
                f"MODEL.WEIGHTS {source} holds {flavour} ImageNet weights of the student, but the student is "
                f"configured for the other kind ({'; '.join(wrong)}); these weights need {want}"
            )


def _input_mismatches(model, flavour: str) -> list:
    """Settings of ``model`` that contradict the input its ImageNet weights were trained with."""
    want = IMAGENET_INPUT[flavour]
    wrong = []
    fmt = getattr(model, "input_format", None)
    if fmt is not None and fmt != want["INPUT.FORMAT"]:
        wrong.append(f"INPUT.FORMAT {fmt}")
    std = getattr(model, "pixel_std", None)
    if isinstance(std, torch.Tensor):
        unit_scale = bool((std.flatten() < 10).all())  # 0-255 input, not divided per channel
        if unit_scale != (flavour == "caffe2"):
            wrong.append(f"MODEL.PIXEL_STD {[round(float(v), 3) for v in std.flatten()]}")
    bottom_up = getattr(getattr(model, "backbone", None), "bottom_up", None)
    block = getattr(bottom_up, "res3", None)
    first = block[0] if isinstance(block, torch.nn.Sequential) and len(block) else None
    if first is not None and hasattr(first, "conv3"):  # a bottleneck block: where is the stride?
        stride_in_1x1 = tuple(first.conv1.stride) != (1, 1)
        if stride_in_1x1 != want["MODEL.RESNETS.STRIDE_IN_1X1"]:
            wrong.append(f"MODEL.RESNETS.STRIDE_IN_1X1 {stride_in_1x1}")
    return wrong
