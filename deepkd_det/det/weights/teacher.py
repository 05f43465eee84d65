"""The teacher's weights: where they come from, how they are checked, how they are loaded.

TEACHER.MODEL.WEIGHTS (a detectron2 checkpoint of the teacher: model-zoo ``.pkl`` or ``.pth``,
with or without the ``teacher.`` prefix), else the ``teacher.*`` keys of MODEL.WEIGHTS (a combined
release file); both set and holding different teachers is an error. Every teacher tensor must
come from the file (one mismatch report, ``report.mismatch_problems``), except running statistics
a legacy file folded into its weights and the teacher modules no distillation part runs
(``layouts.absent_teacher_modules``: mask heads; heads the parts' ``needs`` leave out).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping

import torch
from torch import nn

from .layouts import (
    IGNORED_CHECKPOINT_KEYS,
    TEACHER_PREFIX,
    absent_statistics_allowed,
    absent_teacher_modules,
    frozen_bn_statistics,
    read_checkpoint,
)
from .report import mismatch_problems

__all__ = [
    "TeacherWeightsError",
    "teacher_state_from_checkpoint",
    "load_teacher_weights",
    "load_teacher",
    "load_teacher_from",
    "YACS_TEACHER_KEYS",
    "check_teacher_state",
    "teacher_differences",
    "check_same_teacher",
    "with_absent_teacher_modules",
]

logger = logging.getLogger(__name__)


class TeacherWeightsError(ValueError):
    """The teacher checkpoint does not match the teacher model."""


def teacher_state_from_checkpoint(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The teacher's state dict inside a checkpoint.

    A combined file (``teacher.*`` keys next to the student's) gives its ``teacher.*`` entries,
    prefix removed; any other file is a teacher detector checkpoint as a whole. Keys of old
    detectron2 checkpoints that are not model state (pixel_mean/std, cell anchors) are dropped.
    """
    if any(k.startswith(TEACHER_PREFIX) for k in state):
        state = {k[len(TEACHER_PREFIX) :]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
    return {k: v for k, v in state.items() if not IGNORED_CHECKPOINT_KEYS.search(k)}


def _legacy_frozen_bn_stats(
    teacher: nn.Module, tstate: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Running statistics to fill (mean 0 / variance 1) for a file that holds no FrozenBN
    statistic at all (statistics folded into weight and bias, as detectron2 reads such files);
    nothing for a file that holds some of them (see ``absent_statistics_allowed``)."""
    own = dict(teacher.named_buffers())
    fills = {}
    for k in absent_statistics_allowed(frozen_bn_statistics(teacher), tstate):
        fill = torch.zeros_like if k.endswith("running_mean") else torch.ones_like
        fills[k] = fill(own[k])
    return fills


def check_teacher_state(teacher: nn.Module, tstate: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise TeacherWeightsError naming missing keys, unexpected keys and shape mismatches.

    ``tstate`` is the teacher's state dict (no ``teacher.`` prefix). A different class count
    gets its own message.
    """
    own = teacher.state_dict()
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    if cls_key in tstate and cls_key in own and tstate[cls_key].shape[0] != own[cls_key].shape[0]:
        raise TeacherWeightsError(
            f"teacher checkpoint {source} has {tstate[cls_key].shape[0] - 1} classes but the teacher is built "
            f"with TEACHER.MODEL.ROI_HEADS.NUM_CLASSES={own[cls_key].shape[0] - 1}; teacher and student "
            "must classify the same classes"
        )
    problems = mismatch_problems(own, tstate, what="teacher", may_be_missing=_legacy_frozen_bn_stats(teacher, tstate),
                                 limit=30)
    if problems:
        raise TeacherWeightsError(
            f"teacher checkpoint {source} does not match the teacher built from cfg.TEACHER "
            "(a partly random teacher must not be trained against): " + "; ".join(problems)
        )


def teacher_differences(teacher: nn.Module, tstate: Mapping[str, torch.Tensor], limit: int = 10) -> List[str]:
    """Keys (at most ``limit``) whose tensors in ``tstate`` differ from the teacher's, or that
    only one of the two holds (statistics a legacy file may omit excepted)."""
    own = teacher.state_dict()
    tstate = {**_legacy_frozen_bn_stats(teacher, tstate), **tstate}
    out = sorted(set(own) ^ set(tstate))[:limit]
    for k, v in own.items():
        if len(out) >= limit:
            break
        if k in tstate and not (
            tstate[k].shape == v.shape and torch.equal(tstate[k].to(device=v.device, dtype=v.dtype), v)
        ):
            out.append(k)
    return out


def check_same_teacher(teacher, tstate: Mapping[str, torch.Tensor], path: str) -> None:
    """A teacher loaded at build time and the ``teacher.*`` part of ``path`` must hold the same
    tensors: TEACHER.MODEL.WEIGHTS and a combined MODEL.WEIGHTS never compete silently."""
    if teacher.weights_source is None:
        return
    diff = teacher_differences(teacher, tstate)
    if diff:
        key, source = teacher.weights_source
        raise TeacherWeightsError(
            f"two different teachers: {key}={source!r} (loaded at build time) and the teacher.* keys of "
            f"{path!r} (MODEL.WEIGHTS or a checkpoint being loaded) differ, e.g. in {diff[:5]}; set only one "
            "of them (TEACHER.MODEL.WEIGHTS empty to use the combined file's teacher, or a MODEL.WEIGHTS "
            "without teacher.* keys)"
        )


def load_teacher_weights(
    teacher: nn.Module,
    path: str,
    state: Mapping[str, torch.Tensor] | None = None,
    source_key: str = "TEACHER.MODEL.WEIGHTS",
    needs=None,
) -> None:
    """Load the teacher from ``path`` (or its already read ``state``), checking it completely.

    Raises TeacherWeightsError naming missing keys, unexpected keys and shape mismatches.
    ``source_key``: the config key that named ``path`` (recorded in ``teacher.weights_source``);
    ``needs``: what the parts read of the teacher (``with_absent_teacher_modules``).
    """
    if state is None:
        state, extra = read_checkpoint(path)
        if extra.get("matching_heuristics"):
            raise TeacherWeightsError(
                f"{path} is a Caffe2/Detectron1 or ImageNet file, not a detectron2 detector checkpoint; "
                "the teacher needs a trained detectron2 detector (model zoo .pkl or .pth)"
            )
    tstate = with_absent_teacher_modules(teacher, teacher_state_from_checkpoint(state), path, needs)
    check_teacher_state(teacher, tstate, path)
    tstate.update(_legacy_frozen_bn_stats(teacher, tstate))
    own = teacher.state_dict()
    teacher.load_state_dict({k: v.to(own[k].dtype) for k, v in tstate.items()}, strict=True)
    if hasattr(teacher, "weights_source"):
        teacher.weights_source = (source_key, str(path))
    logger.info("Loaded all %d teacher tensors from %s", len(own), path)


def _has_teacher_keys(path: str) -> Mapping[str, torch.Tensor] | None:
    state, _ = read_checkpoint(path)
    return state if any(k.startswith(TEACHER_PREFIX) for k in state) else None




def with_absent_teacher_modules(teacher: nn.Module, tstate: Mapping[str, torch.Tensor], source: str, needs=None):
    """``tstate`` completed with the teacher's own tensors for the modules a file may leave out
    (``absent_teacher_modules``: mask / keypoint heads, which no part runs, and the heads ``needs``
    (what the parts read of the teacher) leaves out): release files of the Mask R-CNN pairs hold
    no teacher mask head, the RetinaNet pair's ``r50-rt101.pth`` only ``teacher.backbone.*``.
    Those modules keep their initialisation and are never run."""
    own = teacher.state_dict()
    absent = absent_teacher_modules(own.keys(), tstate.keys(), needs)
    if not absent:
        return tstate
    tstate = dict(tstate)
    for prefix, keys in absent.items():
        logger.info("%s holds no teacher %s* (%d tensors): no distillation part runs it, it keeps its "
                    "initialisation", source, prefix, len(keys))
        tstate.update({k: own[k] for k in keys})
    return tstate


# The names of the three teacher-weight settings in messages: the yacs keys (a LazyConfig passes
# its own, deepkd_det/det/distill/lazy.py).
YACS_TEACHER_KEYS = {"weights": "TEACHER.MODEL.WEIGHTS", "student_weights": "MODEL.WEIGHTS",
                     "allow_random_init": "TEACHER.ALLOW_RANDOM_INIT"}


def load_teacher(teacher, cfg, needs=None) -> None:
    """Load the built ``teacher``'s weights as cfg says (module docstring); ``needs``: what the
    distillation parts read of it."""
    load_teacher_from(teacher, cfg.TEACHER.MODEL.WEIGHTS, cfg.MODEL.WEIGHTS, cfg.TEACHER.ALLOW_RANDOM_INIT,
                      needs=needs)


def load_teacher_from(teacher, weights: str, student_weights: str, allow_random_init: bool,
                      keys: Mapping[str, str] = YACS_TEACHER_KEYS, needs=None) -> None:
    """The teacher's weights, by the one rule of both entry points (train_net.py, and
    tools/lazy_train_net.py through deepkd_det/det/distill/lazy.py): ``weights`` (a detectron2
    checkpoint of the teacher), else the ``teacher.*`` keys of ``student_weights`` (a combined
    release file); without either the build stops (TeacherWeightsError naming ``keys``) unless
    ``allow_random_init`` (tests and smoke runs). Both set and holding different teachers is an
    error (here for a ``.pth`` student file, in DeepKDCheckpointer for any file)."""
    if weights:
        load_teacher_weights(teacher, weights, source_key=keys["weights"], needs=needs)
        combined = (
            _has_teacher_keys(student_weights)
            if student_weights and not student_weights.endswith(".pkl")
            else None
        )
        if combined is not None:
            check_same_teacher(teacher, teacher_state_from_checkpoint(combined), student_weights)
    elif (
        student_weights
        and not student_weights.endswith(".pkl")
        and (state := _has_teacher_keys(student_weights))
    ):
        load_teacher_weights(teacher, student_weights, state, source_key=keys["student_weights"], needs=needs)
    elif allow_random_init:
        logger.warning(f"{keys['allow_random_init']}: the teacher is RANDOMLY INITIALISED (tests / smoke runs only)")
    else:
        raise TeacherWeightsError(
            f"no teacher weights: set {keys['weights']} to a detectron2 checkpoint of the teacher, or "
            f"{keys['student_weights']} to a combined file with teacher.* keys (tools/make_kd_weights.py); "
            f"{keys['student_weights']}={student_weights!r} has no teacher keys"
        )
