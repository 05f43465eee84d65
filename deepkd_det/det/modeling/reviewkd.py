"""ReviewKD feature distillation in the detector: the student-side review head, built from cfg.

The head (``deepkd_det.core.reviewkd.ReviewKDHead``) maps the student's FPN levels to the
teacher's channels; it is a trained part of the student (state-dict keys ``reviewkd_head.*``,
never under ``teacher.``) and is used only in training.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

from detectron2.layers import ShapeSpec

from deepkd_det.core.reviewkd import ReviewKDHead

__all__ = [
    "REVIEWKD_HEAD_PREFIX",
    "RELEASE_HEAD_PREFIX",
    "build_reviewkd_head",
    "check_reviewkd_features",
    "check_shared_features",
    "release_head_keys_to_ours",
]

# Attribute of DeepKDRCNN holding the head, hence the prefix of its state-dict keys.
REVIEWKD_HEAD_PREFIX = "reviewkd_head."
# The ReviewKD release (dvlab-research/ReviewKD Detection/, mdistiller detection/) names its head
# ``kd_trans``: ``kd_trans.abfs.<j>.{conv1,conv2,att_conv}.*``, where ``abfs`` was reversed after
# construction, so ``j = 0`` is the coarsest level (ours: ``abfs.<i>``, ``i = 0`` the finest).
RELEASE_HEAD_PREFIX = "kd_trans."
_RELEASE_HEAD_KEY = re.compile(r"^kd_trans\.abfs\.(\d+)\.(conv1|conv2|att_conv)\.(.+)$")
_RELEASE_PARTS = {"conv1": "lateral", "conv2": "output", "att_conv": "attention"}


def release_head_keys_to_ours(state: Mapping) -> Mapping:
    """Rename the release's ``kd_trans.*`` head keys to ``reviewkd_head.*`` (levels reversed,
    ``conv1`` / ``conv2`` / ``att_conv`` -> ``lateral`` / ``output`` / ``attention``); a state
    without them is returned as it is. A key of another shape, or both spellings in one file,
    raise ValueError."""
    release = [k for k in state if k.startswith(RELEASE_HEAD_PREFIX)]
    if not release:
        return state
    if any(k.startswith(REVIEWKD_HEAD_PREFIX) for k in state):
        raise ValueError(f"the checkpoint holds both {RELEASE_HEAD_PREFIX}* and {REVIEWKD_HEAD_PREFIX}* head keys")
    bad = [k for k in release if not _RELEASE_HEAD_KEY.match(k)]
    if bad:
        raise ValueError(f"unexpected ReviewKD release head keys: {bad[:10]}")
    levels = sorted({int(_RELEASE_HEAD_KEY.match(k)[1]) for k in release})
    if levels != list(range(len(levels))):
        raise ValueError(f"ReviewKD release head levels {levels} are not 0..{len(levels) - 1}")
    out = OrderedDict()
    for k, v in state.items():
        m = _RELEASE_HEAD_KEY.match(k)
        if m is None:
            out[k] = v
        else:
            level = len(levels) - 1 - int(m[1])
            out[f"{REVIEWKD_HEAD_PREFIX}abfs.{level}.{_RELEASE_PARTS[m[2]]}.{m[3]}"] = v
    return out


def check_shared_features(
    key: str, names, student_shapes: Mapping[str, ShapeSpec], teacher_shapes: Mapping[str, ShapeSpec]
) -> None:
    """Every name of config key ``key`` must be an output of both FPNs, with the same stride in
    both (so that the maps of one padded batch have the same size). Used by every feature KD."""
    for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
        missing = [n for n in names if n not in shapes]
        if missing:
            raise ValueError(
                f"{key} {list(names)}: {missing} not among the {side}'s backbone outputs {sorted(shapes)}"
            )
    for n in names:
        s, t = student_shapes[n].stride, teacher_shapes[n].stride
        if s != t:
            raise ValueError(f"{key}: {n!r} has stride {s} in the student, {t} in the teacher")


def check_reviewkd_features(
    names, student_shapes: Mapping[str, ShapeSpec], teacher_shapes: Mapping[str, ShapeSpec]
) -> None:
    """``check_shared_features`` for KD.REVIEWKD.IN_FEATURES, and the names must go finest first
    (strictly increasing stride: the review path fuses each level with the next coarser one)."""
    check_shared_features("KD.REVIEWKD.IN_FEATURES", names, student_shapes, teacher_shapes)
    strides = [student_shapes[n].stride for n in names]
    if any(a >= b for a, b in zip(strides, strides[1:])):
        raise ValueError(
            f"KD.REVIEWKD.IN_FEATURES {list(names)} must go finest first (strictly increasing strides), "
            f"got strides {strides}"
        )


def build_reviewkd_head(cfg, student_backbone, teacher_backbone) -> ReviewKDHead:
    """The review head for cfg.KD.REVIEWKD: student channels in, teacher channels out, per level."""
    names = list(cfg.KD.REVIEWKD.IN_FEATURES)
    s_shapes, t_shapes = student_backbone.output_shape(), teacher_backbone.output_shape()
    check_reviewkd_features(names, s_shapes, t_shapes)
    s_div, t_div = int(student_backbone.size_divisibility), int(teacher_backbone.size_divisibility)
    if t_div > 1 and (s_div < 1 or s_div % t_div):
        raise ValueError(
            f"ReviewKD runs the teacher on the student's padded images: the student's size divisibility "
            f"({s_div}) must be a multiple of the teacher's ({t_div})"
        )
    return ReviewKDHead(
        [s_shapes[n].channels for n in names],
        out_channels=[t_shapes[n].channels for n in names],
        mid_channels=int(cfg.KD.REVIEWKD.MID_CHANNELS),
        norm="BN",
    )
