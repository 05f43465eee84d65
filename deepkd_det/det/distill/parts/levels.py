"""Pairing the student's feature levels with the teacher's, for every feature part.

Levels are paired by stride, not by name: a RetinaNet FPN (p3-p7) and an R-CNN FPN (p2-p6)
share p3-p6, and a teacher of another family may name its levels otherwise. The maps of one
padded batch then have the same spatial size level by level (the teacher runs on the student's
padded batch).
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

from detectron2.layers import ShapeSpec

__all__ = ["pair_levels", "check_padding"]


def pair_levels(
    key: str, names: Sequence[str], student_shapes: Mapping[str, ShapeSpec], teacher_shapes: Mapping[str, ShapeSpec]
) -> Dict[str, str]:
    """``{student level: teacher level of the same stride}`` for the names of config key
    ``key``; a name the student lacks, or a stride the teacher lacks, is a ValueError naming it."""
    missing = [n for n in names if n not in student_shapes]
    if missing:
        raise ValueError(f"{key} {list(names)}: {missing} not among the student's backbone outputs {sorted(student_shapes)}")
    by_stride = {}
    for n, s in teacher_shapes.items():
        by_stride.setdefault(s.stride, n)
    out = {}
    for n in names:
        stride = student_shapes[n].stride
        if stride not in by_stride:
            have = {m: s.stride for m, s in teacher_shapes.items()}
            raise ValueError(f"{key}: the student's {n!r} has stride {stride}, which no teacher output has ({have})")
        # the same name wins when both have it at this stride
        t = n if n in teacher_shapes and teacher_shapes[n].stride == stride else by_stride[stride]
        out[n] = t
    return out


def check_padding(key: str, student_backbone, teacher_backbone) -> None:
    """The teacher runs on the student's padded batch: its padding must divide the student's."""
    s_div, t_div = int(student_backbone.size_divisibility), int(teacher_backbone.size_divisibility)
    if t_div > 1 and (s_div < 1 or s_div % t_div):
        raise ValueError(
            f"{key}: the teacher runs on the student's padded images, so the student's size divisibility "
            f"({s_div}) must be a multiple of the teacher's ({t_div})"
        )
