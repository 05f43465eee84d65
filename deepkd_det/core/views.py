"""Helpers shared by the two-view logit methods (MLKD, CRLD): checks, task loss, row masks.

Both methods feed a weak and a strong augmentation of the same images to teacher and student
and gate some distillation terms by the teacher's confidence. Pure torch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "CONFIDENCE_MASK_MODES",
    "check_mask_mode",
    "check_temperatures",
    "check_two_views",
    "masked_reduce",
    "two_view_cross_entropy",
]

# How a boolean keep-mask over rows (samples or classes) gates a term:
#   "row"     masked rows contribute nothing; the reduction still runs over all rows
#             (sum_i m_i x_i, or (1/N) sum_i m_i x_i for a mean);
#   "release" the term over all rows times the kept fraction mean_i(m_i) -- what the released
#             code computes when it multiplies an already-reduced scalar by the mask and averages;
#   "none"    no gating.
CONFIDENCE_MASK_MODES = ("row", "release", "none")


def check_two_views(
    logits_student_weak: torch.Tensor,
    logits_teacher_weak: torch.Tensor,
    logits_student_strong: torch.Tensor,
    logits_teacher_strong: torch.Tensor,
    target: torch.Tensor,
) -> None:
    """All four logit tensors must be the same ``N x C``; ``target`` must be ``(N,)``."""
    shapes = [tuple(t.shape) for t in (logits_student_weak, logits_teacher_weak,
                                       logits_student_strong, logits_teacher_strong)]
    if len(shapes[0]) != 2 or any(s != shapes[0] for s in shapes):
        raise ValueError(
            "student/teacher logits of the weak and the strong view must all be the same N x C, got "
            f"student_weak={shapes[0]}, teacher_weak={shapes[1]}, student_strong={shapes[2]}, "
            f"teacher_strong={shapes[3]}"
        )
    if tuple(target.shape) != shapes[0][:1]:
        raise ValueError(f"target must have shape ({shapes[0][0]},), got {tuple(target.shape)}")


def check_mask_mode(mode: str) -> None:
    if mode not in CONFIDENCE_MASK_MODES:
        raise ValueError(f"confidence_mask must be one of {CONFIDENCE_MASK_MODES}, got {mode!r}")


def check_temperatures(temperatures: Sequence[float]) -> Tuple[float, ...]:
    temps = tuple(float(t) for t in temperatures)
    if not temps:
        raise ValueError("temperatures must name at least one temperature")
    if any(t <= 0 for t in temps):
        raise ValueError(f"every temperature must be positive, got {temps}")
    return temps


def two_view_cross_entropy(
    logits_student_weak: torch.Tensor, logits_student_strong: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """``CE(z_weak, y) + CE(z_strong, y)``: the task loss both methods use (before its weight)."""
    return F.cross_entropy(logits_student_weak, target) + F.cross_entropy(logits_student_strong, target)


def masked_reduce(values: torch.Tensor, keep: Optional[torch.Tensor], mode: str, reduction: str) -> torch.Tensor:
    """Reduce per-row ``values`` (shape ``(R,)``) over rows, gated by ``keep`` as ``mode`` says.

    ``reduction`` is "mean" (divide by R, masked rows included in the count) or "sum".
    ``keep=None`` or ``mode="none"`` means no gating.
    """
    check_mask_mode(mode)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    agg = torch.mean if reduction == "mean" else torch.sum
    if keep is None or mode == "none":
        return agg(values)
    if keep.shape != values.shape:
        raise ValueError(f"mask of shape {tuple(keep.shape)} does not match values of shape {tuple(values.shape)}")
    keep_f = keep.to(values.dtype)
    if mode == "release":
        return agg(values) * keep_f.mean()
    # where() rather than a product, so a non-finite value in a masked row cannot leak in as 0 * inf.
    return agg(torch.where(keep, values, torch.zeros_like(values)))
