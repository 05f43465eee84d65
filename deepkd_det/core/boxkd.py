"""Box-regression distillation: the student's box deltas pulled towards the teacher's on the same boxes.

DiffKD's detection runs (Huang et al., NeurIPS 2023, arXiv 2305.15712) add a regression KD loss
with weight 1 on Faster R-CNN but publish no code for it; this is the simple form used here:

    L_reg = mean over foreground rows i of  || d_s[i, y_i] - d_t[i, y_i] ||^2

``d`` are the R-CNN box head's regression outputs (encoded deltas dx, dy, dw, dh) for the
sampled proposals both heads saw, ``y_i`` the proposal's ground-truth class (only foreground
rows, ``0 <= y_i < K``: background boxes have no regression target in Faster R-CNN either),
and the 4 deltas of class ``y_i`` are compared (class-agnostic heads: the only 4). The
teacher's deltas are detached.
"""

from __future__ import annotations

import torch

__all__ = ["box_regression_kd_loss"]


def box_regression_kd_loss(
    student_deltas: torch.Tensor, teacher_deltas: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``mean_{i: 0 <= y_i < K} sum_j (d_s[i, 4 y_i + j] - d_t[i, 4 y_i + j])^2`` (0 without foreground).

    ``student_deltas``/``teacher_deltas``: (R, 4K) class-specific or (R, 4) class-agnostic;
    ``labels``: (R,) in ``0..K`` (K = background).
    """
    if student_deltas.shape != teacher_deltas.shape:
        raise ValueError(
            f"student deltas {tuple(student_deltas.shape)} and teacher deltas {tuple(teacher_deltas.shape)} differ"
        )
    rows, cols = student_deltas.shape
    if cols not in (4, 4 * num_classes):
        raise ValueError(f"box deltas must have 4 or 4 * {num_classes} columns, got {cols}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    fg = (labels >= 0) & (labels < num_classes)
    if not bool(fg.any()):
        return student_deltas.sum() * 0.0  # keeps the graph (every rank runs the same backward)
    idx = fg.nonzero(as_tuple=True)[0]
    if cols == 4:
        cols_idx = torch.arange(4, device=labels.device).expand(idx.numel(), 4)
    else:
        cols_idx = 4 * labels[idx, None] + torch.arange(4, device=labels.device)
    s = student_deltas[idx[:, None], cols_idx]
    t = teacher_deltas.detach()[idx[:, None], cols_idx]
    return (s - t).pow(2).sum(dim=1).mean()
