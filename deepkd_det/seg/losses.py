"""Per-pixel distillation: class maps (N, C, H, W) become rows (one per valid pixel) for the core.

Every formula stays in ``deepkd_det.core.losses``: here a student / teacher pair of maps and the
label map become ``(P, C)`` logits and ``(P,)`` labels over the P pixels whose label is not
``ignore_index``, and the core's KD / DKD / TCKD-NCKD functions run on those rows. Ignored pixels
therefore enter no term (a pixel's KD needs no label, but its TCKD / NCKD split does; keeping the
same rows for every method keeps KD = TCKD + (1 - p_t) NCKD exact). Each term is the mean over
the valid pixels of the batch.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from deepkd_det.core.losses import TopK, dkd_components, kd_components, kd_loss

__all__ = ["IGNORE_LABEL", "pixel_cross_entropy", "pixel_dkd_components", "pixel_kd_components", "pixel_kd_loss",
           "pixel_rows"]

IGNORE_LABEL = 255


def pixel_rows(logits_student: torch.Tensor, logits_teacher: torch.Tensor, labels: torch.Tensor,
               ignore_index: int = IGNORE_LABEL) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(zs, zt, y)``: the (P, C) student and teacher logits and (P,) labels of the valid pixels."""
    if logits_student.shape != logits_teacher.shape or logits_student.dim() != 4:
        raise ValueError(f"student and teacher maps must both be N x C x H x W, got {tuple(logits_student.shape)} "
                         f"and {tuple(logits_teacher.shape)}")
    n, c, h, w = logits_student.shape
    if labels.shape != (n, h, w):
        raise ValueError(f"labels must have shape {(n, h, w)} (N x H x W), got {tuple(labels.shape)}")
    valid = (labels != ignore_index).reshape(-1)
    zs = logits_student.permute(0, 2, 3, 1).reshape(-1, c)[valid]
    zt = logits_teacher.permute(0, 2, 3, 1).reshape(-1, c)[valid]
    return zs, zt, labels.reshape(-1)[valid].long()


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.sum() * 0.0  # keeps the graph (and the device) when a batch has no valid pixel


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """Mean cross-entropy over the valid pixels (0 when there is none)."""
    if not bool((labels != ignore_index).any()):
        return _zero(logits)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def pixel_kd_loss(logits_student, logits_teacher, labels, temperature: float = 1.0,
                  ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """Classical KD per pixel, ``T^2 KL(p_t || p_s)``, mean over the valid pixels."""
    zs, zt, _ = pixel_rows(logits_student, logits_teacher, labels, ignore_index)
    return kd_loss(zs, zt, temperature) if zs.shape[0] else _zero(logits_student)


def pixel_kd_components(logits_student, logits_teacher, labels, temperature: float = 1.0, weight: float = 1.0,
                        topk: TopK = None, ignore_index: int = IGNORE_LABEL,
                        topk_rank: str = "nontarget") -> Tuple[torch.Tensor, torch.Tensor]:
    """KD per pixel split into DeepKD's (TCG, NCG) losses (``core.losses.kd_components``, per-pixel
    coupling ``(1 - p_t[y]) NCKD``): with no mask their sum is :func:`pixel_kd_loss` times ``weight``."""
    zs, zt, y = pixel_rows(logits_student, logits_teacher, labels, ignore_index)
    if not zs.shape[0]:
        return _zero(logits_student), _zero(logits_student)
    return kd_components(zs, zt, y, temperature, weight, topk, coupling="row", topk_rank=topk_rank)


def pixel_dkd_components(logits_student, logits_teacher, labels, alpha: float = 1.0, beta: float = 1.0,
                         temperature: float = 1.0, warmup: float = 1.0, topk: TopK = None,
                         ignore_index: int = IGNORE_LABEL, topk_rank: str = "nontarget") -> Tuple[torch.Tensor, torch.Tensor]:
    """DKD per pixel: ``(w alpha TCKD, w beta NCKD)`` over the valid pixels (``core.losses.dkd_components``)."""
    zs, zt, y = pixel_rows(logits_student, logits_teacher, labels, ignore_index)
    if not zs.shape[0]:
        return _zero(logits_student), _zero(logits_student)
    return dkd_components(zs, zt, y, alpha, beta, temperature, warmup, topk, topk_rank=topk_rank)
