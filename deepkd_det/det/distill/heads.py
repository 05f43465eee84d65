"""What the parts may pair between a student and a teacher detector (checked at start-up)."""

from __future__ import annotations

from deepkd_det.det.modeling.teacher import box_head_problem

__all__ = ["rcnn_pairing_problem", "head_name", "dense_head_problem"]


def head_name(model) -> str:
    """A short name of a detector's prediction head, for messages."""
    rh = getattr(model, "roi_heads", None)
    if rh is not None:
        return f"{type(model).__name__} with {type(rh).__name__}"
    head = getattr(model, "head", None)
    return f"{type(model).__name__} with {type(head).__name__}" if head is not None else type(model).__name__


def rcnn_pairing_problem(student, teacher) -> str | None:
    """Why the student's and the teacher's R-CNN box heads cannot be paired on the same boxes
    (None: they can): each needs one box head that classifies given boxes, with the same classes."""
    t_model = teacher.model if teacher is not None else None
    for side, model in (("student", student), ("teacher", t_model)):
        problem = box_head_problem(model) if model is not None else "no teacher"
        if problem:
            return (f"cannot pair the student's head ({head_name(student)}) with the teacher's "
                    f"({head_name(t_model) if t_model is not None else 'none'}): the {side} {problem}")
    s_classes, t_classes = student.roi_heads.num_classes, teacher.num_classes
    if s_classes != t_classes:
        return f"teacher has {t_classes} classes, student {s_classes}: they must agree"
    return None


def dense_head_problem(student, teacher) -> str | None:
    """Why the student's and the teacher's dense heads (RetinaNet-like: per-level class logits and
    box deltas over the same anchors) cannot be paired (None: they can)."""
    t_model = teacher.model if teacher is not None else None
    for side, model in (("student", student), ("teacher", t_model)):
        if model is None or not hasattr(model, "head") or not hasattr(model, "anchor_generator"):
            return (f"cannot pair the student's head ({head_name(student)}) with the teacher's "
                    f"({head_name(t_model) if t_model is not None else 'none'}): the {side} has no dense "
                    "(RetinaNet-like) head")
    s_anchors = student.anchor_generator.num_cell_anchors
    t_anchors = t_model.anchor_generator.num_cell_anchors
    if list(s_anchors) != list(t_anchors):
        return f"the student has {list(s_anchors)} anchors per location and level, the teacher {list(t_anchors)}"
    if student.num_classes != t_model.num_classes:
        return f"teacher has {t_model.num_classes} classes, student {student.num_classes}: they must agree"
    s_levels = [student.backbone.output_shape()[f].stride for f in student.head_in_features]
    t_levels = [t_model.backbone.output_shape()[f].stride for f in t_model.head_in_features]
    if s_levels != t_levels:
        return f"the student's head sees strides {s_levels}, the teacher's {t_levels}"
    return None
