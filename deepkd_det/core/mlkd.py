"""MLKD, Multi-Level Logit Distillation (Jin, Wang, Lin, CVPR 2023), plain and split for DeepKD.

Inputs: student and teacher logits on a weak and a strong augmentation of the same N images
(all ``N x C``) and the labels ``y``. ``p_T = softmax(z / T)``; teacher logits never get gradient.

Prediction augmentation: every term is summed over a set of temperatures ``T in temps``
(the release uses ``{KD.TEMPERATURE, 3, 5, 2, 6}``, i.e. ``{2, 3, 4, 5, 6}`` with its CIFAR
default ``T = 4``).

Teacher-confidence masks (release code; from the weak view, at T = 1, no gradient):
    c_i = max_k p_t^w[i, k]          m_i = [c_i <= median_j c_j]            (samples)
    a_k = sum_i p_t^w[i, k]           u_k = [a_k <= median_l a_l]            (classes)
(median = 50th percentile with linear interpolation, as numpy's ``percentile``.)

The three alignment levels, for one view and one temperature:
    instance  KD_i  = T^2 KL(p_t[i] || p_s[i])                                 per sample i
    batch     G = P P^T (N x N, sample correlation)   r_i = (1/N) sum_j (G_t - G_s)_ij^2
    class     M = P^T P (C x C, class correlation)    r_k = (1/C) sum_l (M_t - M_s)_kl^2
so that sum_i r_i = ||G_t - G_s||_F^2 / N and sum_k r_k = ||M_t - M_s||_F^2 / C (no T^2 on
these two, as released).

Plain MLKD (what the released distiller optimises):
    L = ce_w * (CE(z_s^w, y) + CE(z_s^s, y))
      + kd_w * sum_T [ gate_m(mean_i KD^w_i) + mean_i KD^s_i ]        (loss_kd)
      + kd_w * sum_T gate_m(sum_i r^w_i)                              (loss_bc, weak view only)
      + kd_w * sum_T gate_u(sum_k r^w_k)                              (loss_cc, weak view only)
``gate`` depends on ``confidence_mask`` (see core.views): "release" (default) multiplies the
term by the kept fraction -- the released code multiplies an already-reduced scalar by the
mask and averages, so the mask only ever acts as that factor (about 1/2 with a median split);
"row" drops the masked rows' contributions instead; "none" applies no mask.
Release facts left out on purpose: its strong-view KD at T = 2 and 6 is fed the weak logits
(a copy-paste slip; the DeepKD release's MLKD path uses the strong logits, as here), and it
computes batch/class terms on the strong view but never adds them.

DeepKD split (``mlkd_components``, after the DeepKD release's MLKD distiller): each instance
KD term is decoupled with :func:`core.losses.kd_parts` (top-k mask on NCKD only):
    split="dkd" (release configs, beta 2.0 on CIFAR):
        tcg = w * kd_w * sum_T [ gate_m(mean_i alpha TCKD^w_i) + mean_i alpha TCKD^s_i ]
        ncg = w * kd_w * sum_T [ gate_m(mean_i beta NCKD^w_i)  + mean_i beta NCKD^s_i  ]
    split="kd" (exact): TCKD_i and (1 - p_t[y]_i) NCKD_i instead, so that with no top-k mask
        and w = 1, tcg + ncg == loss_kd exactly.
    tog = ce_w * (CE^w + CE^s) + loss_bc + loss_cc     (the release adds the correlation terms
                                                        to the task loss, i.e. to TOG)
``w`` is the DKD warm-up factor the caller computes (core.losses.warmup_factor).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from .losses import TopK, kd_loss, kd_parts
from .views import (
    check_mask_mode,
    check_temperatures,
    check_two_views,
    masked_reduce,
    two_view_cross_entropy,
)

__all__ = [
    "MLKD_DEFAULTS",
    "MLKD_TEMPERATURES",
    "batch_correlation_rows",
    "class_correlation_rows",
    "mlkd_components",
    "mlkd_confidence_masks",
    "mlkd_loss",
]

# {KD.TEMPERATURE, 3, 5, 2, 6} of the release with its default KD.TEMPERATURE = 4.
MLKD_TEMPERATURES: Tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)
# The one statement of MLKD's defaults (the functions below and the classification config's MLKD
# node): the MLKD release's weights (its configs keep mdistiller's KD defaults, CE 0.1, KD 0.9;
# the DeepKD release's MLKD configs set 0.5 / 0.5 with split dkd, beta 2, in their own files) and
# the exact TCKD/NCKD split, so that DeepKD's components sum to plain MLKD.
MLKD_DEFAULTS = {"ce_weight": 0.1, "kd_weight": 0.9, "split": "kd", "alpha": 1.0, "beta": 2.0}


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits if logits.dtype == torch.float64 else logits.float()
    return F.softmax(z / temperature, dim=1)


def batch_correlation_rows(
    logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-sample rows ``r_i = (1/N) sum_j (G_t - G_s)_ij^2`` with ``G = P P^T`` (shape ``(N,)``)."""
    ps = _probs(logits_student, temperature)
    pt = _probs(logits_teacher.detach(), temperature)
    diff = pt @ pt.t() - ps @ ps.t()
    return diff.pow(2).sum(dim=1) / ps.shape[0]


def class_correlation_rows(
    logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-class rows ``r_k = (1/C) sum_l (M_t - M_s)_kl^2`` with ``M = P^T P`` (shape ``(C,)``)."""
    ps = _probs(logits_student, temperature)
    pt = _probs(logits_teacher.detach(), temperature)
    diff = pt.t() @ pt - ps.t() @ ps
    return diff.pow(2).sum(dim=1) / ps.shape[1]


def mlkd_confidence_masks(logits_teacher_weak: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sample_keep (N,), class_keep (C,))``: teacher confidence at or below its batch median.

    Samples are ranked by ``max_k p_t[i, k]``, classes by ``sum_i p_t[i, k]`` (weak view, T = 1).
    """
    p = _probs(logits_teacher_weak.detach(), 1.0)
    confidence = p.max(dim=1).values
    class_confidence = p.sum(dim=0)
    sample_keep = confidence <= torch.quantile(confidence, 0.5)
    class_keep = class_confidence <= torch.quantile(class_confidence, 0.5)
    return sample_keep, class_keep


def _masks(logits_teacher_weak: torch.Tensor, confidence_mask: str):
    check_mask_mode(confidence_mask)
    if confidence_mask == "none":
        return None, None
    return mlkd_confidence_masks(logits_teacher_weak)


def _correlation_terms(zs_w, zt_w, temps, sample_keep, class_keep, mode):
    loss_bc = sum(masked_reduce(batch_correlation_rows(zs_w, zt_w, t), sample_keep, mode, "sum") for t in temps)
    loss_cc = sum(masked_reduce(class_correlation_rows(zs_w, zt_w, t), class_keep, mode, "sum") for t in temps)
    return loss_bc, loss_cc


def mlkd_loss(
    logits_student_weak: torch.Tensor,
    logits_teacher_weak: torch.Tensor,
    logits_student_strong: torch.Tensor,
    logits_teacher_strong: torch.Tensor,
    target: torch.Tensor,
    temperatures: Sequence[float] = MLKD_TEMPERATURES,
    ce_weight: float = MLKD_DEFAULTS["ce_weight"],
    kd_weight: float = MLKD_DEFAULTS["kd_weight"],
    confidence_mask: str = "release",
    logit_stand: bool = False,
) -> Dict[str, torch.Tensor]:
    """Plain MLKD as four terms (sum them): ``loss_ce``, ``loss_kd``, ``loss_bc``, ``loss_cc``.

    Defaults: ``MLKD_DEFAULTS``.
    ``logit_stand`` standardises the logits of the instance-level KD terms only, as released.
    """
    check_two_views(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong, target)
    temps = check_temperatures(temperatures)
    sample_keep, class_keep = _masks(logits_teacher_weak, confidence_mask)
    loss_kd = 0.0
    for t in temps:
        kd_weak = kd_loss(logits_student_weak, logits_teacher_weak, t, logit_stand, reduction="none")
        loss_kd = loss_kd + masked_reduce(kd_weak, sample_keep, confidence_mask, "mean")
        loss_kd = loss_kd + kd_loss(logits_student_strong, logits_teacher_strong, t, logit_stand)
    loss_bc, loss_cc = _correlation_terms(
        logits_student_weak, logits_teacher_weak, temps, sample_keep, class_keep, confidence_mask
    )
    return {
        "loss_ce": ce_weight * two_view_cross_entropy(logits_student_weak, logits_student_strong, target),
        "loss_kd": kd_weight * loss_kd,
        "loss_bc": kd_weight * loss_bc,
        "loss_cc": kd_weight * loss_cc,
    }


def _split_rows(parts, split: str, alpha: float, beta: float):
    """Per-row (TCG, NCG) terms of one view and temperature."""
    if split == "dkd":
        return alpha * parts.tckd, beta * parts.nckd
    return parts.tckd, (1.0 - parts.teacher_target_prob) * parts.nckd


def mlkd_components(
    logits_student_weak: torch.Tensor,
    logits_teacher_weak: torch.Tensor,
    logits_student_strong: torch.Tensor,
    logits_teacher_strong: torch.Tensor,
    target: torch.Tensor,
    temperatures: Sequence[float] = MLKD_TEMPERATURES,
    ce_weight: float = MLKD_DEFAULTS["ce_weight"],
    kd_weight: float = MLKD_DEFAULTS["kd_weight"],
    split: str = MLKD_DEFAULTS["split"],
    alpha: float = MLKD_DEFAULTS["alpha"],
    beta: float = MLKD_DEFAULTS["beta"],
    warmup: float = 1.0,
    topk: TopK = None,
    confidence_mask: str = "release",
    logit_stand: bool = False,
    topk_rank: str = "nontarget",
) -> Dict[str, torch.Tensor]:
    """MLKD as DeepKD's three losses ``{"tog", "tcg", "ncg"}`` (formulas in the module docstring).

    Defaults: ``MLKD_DEFAULTS``, those of ``mlkd_loss`` (the DeepKD release's CIFAR-100 MLKD
    configs, CE 0.5, KD 0.5, DKD split, are configs/cls files). ``warmup`` is the already-computed warm-up factor; ``topk`` (None, int or
    per-row LongTensor) masks the NCKD terms of both views, ranked by each view's teacher as
    ``topk_rank`` says (core.losses.topk_nontarget_mask).
    """
    check_two_views(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong, target)
    temps = check_temperatures(temperatures)
    if split not in ("dkd", "kd"):
        raise ValueError(f"split must be 'dkd' or 'kd', got {split!r}")
    sample_keep, class_keep = _masks(logits_teacher_weak, confidence_mask)
    views = (
        (logits_student_weak, logits_teacher_weak, sample_keep),
        (logits_student_strong, logits_teacher_strong, None),  # the strong view is never masked
    )
    tcg = ncg = 0.0
    for t in temps:
        for zs, zt, keep in views:
            parts = kd_parts(zs, zt, target, t, topk, logit_stand, reduction="none", topk_rank=topk_rank)
            tc_rows, nc_rows = _split_rows(parts, split, alpha, beta)
            tcg = tcg + masked_reduce(tc_rows, keep, confidence_mask, "mean")
            ncg = ncg + masked_reduce(nc_rows, keep, confidence_mask, "mean")
    loss_bc, loss_cc = _correlation_terms(
        logits_student_weak, logits_teacher_weak, temps, sample_keep, class_keep, confidence_mask
    )
    tog = ce_weight * two_view_cross_entropy(logits_student_weak, logits_student_strong, target)
    return {
        "tog": tog + kd_weight * (loss_bc + loss_cc),
        "tcg": warmup * kd_weight * tcg,
        "ncg": warmup * kd_weight * ncg,
    }

