"""CRLD, Cross-View Consistency Regularisation for KD (ACM MM 2024), plain and split for DeepKD.

Inputs: student and teacher logits on a weak view ``w`` and a strong view ``s`` of the same N
images (all ``N x C``) and the labels ``y``. ``KD(a, b)_i = T^2 KL(softmax(b_i/T) || softmax(a_i/T))``
is the per-sample KD of student logits ``a`` towards teacher logits ``b``.

Teacher-confidence masks (T = 1, no gradient), thresholds from the release configs:
    m^w_i = [max_k softmax(z_t^w)_ik >= tau_w]     tau_w = 0.9   gates the within-view terms
    m^s_i = [max_k softmax(z_t^s)_ik >= tau_s]     tau_s = 0.2   gates the cross-view terms

Plain CRLD (release weights: CE 1.0, within-view 2.0, cross-view 0.5, T = 4 on CIFAR-100;
its ImageNet config uses T = 1 and CE 2.0):
    loss_ce    = ce_w * (CE(z_s^w, y) + CE(z_s^s, y))
    loss_kd_wv = wv_w * (1/N) sum_i m^w_i [KD(z_s^w, z_t^w)_i + KD(z_s^s, z_t^s)_i]   within view
    loss_kd_cv = cv_w * (1/N) sum_i m^s_i [KD(z_s^s, z_t^w)_i + KD(z_s^w, z_t^s)_i]   cross view
(z_s = student, z_t = teacher; a masked sample still counts in N.)

DeepKD split (``crld_components``, after the DeepKD release's CRLD distiller): each of the four
KD pairs is decoupled with :func:`core.losses.kd_parts` (top-k mask on NCKD only, ranked by that
pair's teacher) and gated and weighted like its KD term:
    split="dkd" (release configs: alpha 1, beta 2.0 on CIFAR-100, 0.5 on ImageNet):
        tcg = w * [wv_w (1/N) sum_i m^w_i sum_{pairs wv} alpha TCKD_i + cv_w ... m^s_i ... ]
        ncg = the same with beta NCKD_i
    split="kd" (exact): TCKD_i and (1 - p_t[y]_i) NCKD_i, so that with no top-k mask and
        w = 1, tcg + ncg == loss_kd_wv + loss_kd_cv exactly.
    tog = loss_ce
``confidence_mask="row"`` (default) gates per sample as plain CRLD does. The DeepKD release
applies the masks to batch-mean scalars, so there they act as the kept fraction mean_i(m_i);
``confidence_mask="release"`` reproduces that.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .losses import TopK, kd_loss, kd_parts
from .views import check_mask_mode, check_two_views, masked_reduce, two_view_cross_entropy

__all__ = ["CRLD_DEFAULTS", "CRLD_TAU_STRONG", "CRLD_TAU_WEAK", "crld_components", "crld_confidence_masks", "crld_loss"]

CRLD_TAU_WEAK = 0.9
CRLD_TAU_STRONG = 0.2
# The one statement of CRLD's defaults (the functions below and the classification config's CRLD
# node): the release's weights, and the exact TCKD/NCKD split, so that DeepKD's components sum to
# plain CRLD (the DeepKD release's configs choose split dkd, alpha 1, beta 2, in their own files).
CRLD_DEFAULTS = {"temperature": 4.0, "ce_weight": 1.0, "within_weight": 2.0, "cross_weight": 0.5, "split": "kd",
                 "alpha": 1.0, "beta": 2.0}


def _check_tau(name: str, tau: float) -> None:
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"{name} is a probability threshold and must lie in [0, 1], got {tau}")


def crld_confidence_masks(
    logits_teacher_weak: torch.Tensor,
    logits_teacher_strong: torch.Tensor,
    tau_weak: float = CRLD_TAU_WEAK,
    tau_strong: float = CRLD_TAU_STRONG,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keep_weak, keep_strong)``, each ``(N,)`` bool: the teacher's top probability >= tau."""
    _check_tau("tau_weak", tau_weak)
    _check_tau("tau_strong", tau_strong)

    def confidence(z: torch.Tensor) -> torch.Tensor:
        z = z.detach()
        z = z if z.dtype == torch.float64 else z.float()
        return F.softmax(z, dim=1).max(dim=1).values

    return confidence(logits_teacher_weak) >= tau_weak, confidence(logits_teacher_strong) >= tau_strong


def _pairs(zs_w, zt_w, zs_s, zt_s):
    """(student, teacher) pairs of the within-view and of the cross-view terms."""
    return ((zs_w, zt_w), (zs_s, zt_s)), ((zs_s, zt_w), (zs_w, zt_s))


def crld_loss(
    logits_student_weak: torch.Tensor,
    logits_teacher_weak: torch.Tensor,
    logits_student_strong: torch.Tensor,
    logits_teacher_strong: torch.Tensor,
    target: torch.Tensor,
    temperature: float = CRLD_DEFAULTS["temperature"],
    ce_weight: float = CRLD_DEFAULTS["ce_weight"],
    within_weight: float = CRLD_DEFAULTS["within_weight"],
    cross_weight: float = CRLD_DEFAULTS["cross_weight"],
    tau_weak: float = CRLD_TAU_WEAK,
    tau_strong: float = CRLD_TAU_STRONG,
    logit_stand: bool = False,
) -> Dict[str, torch.Tensor]:
    """Plain CRLD as three terms (sum them): ``loss_ce``, ``loss_kd_wv``, ``loss_kd_cv``."""
    check_two_views(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong, target)
    keep_w, keep_s = crld_confidence_masks(logits_teacher_weak, logits_teacher_strong, tau_weak, tau_strong)
    within, cross = _pairs(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong)

    def gated(pairs, keep):
        rows = sum(kd_loss(zs, zt, temperature, logit_stand, reduction="none") for zs, zt in pairs)
        return masked_reduce(rows, keep, "row", "mean")

    return {
        "loss_ce": ce_weight * two_view_cross_entropy(logits_student_weak, logits_student_strong, target),
        "loss_kd_wv": within_weight * gated(within, keep_w),
        "loss_kd_cv": cross_weight * gated(cross, keep_s),
    }


def crld_components(
    logits_student_weak: torch.Tensor,
    logits_teacher_weak: torch.Tensor,
    logits_student_strong: torch.Tensor,
    logits_teacher_strong: torch.Tensor,
    target: torch.Tensor,
    temperature: float = CRLD_DEFAULTS["temperature"],
    ce_weight: float = CRLD_DEFAULTS["ce_weight"],
    within_weight: float = CRLD_DEFAULTS["within_weight"],
    cross_weight: float = CRLD_DEFAULTS["cross_weight"],
    tau_weak: float = CRLD_TAU_WEAK,
    tau_strong: float = CRLD_TAU_STRONG,
    split: str = CRLD_DEFAULTS["split"],
    alpha: float = CRLD_DEFAULTS["alpha"],
    beta: float = CRLD_DEFAULTS["beta"],
    warmup: float = 1.0,
    topk: TopK = None,
    confidence_mask: str = "row",
    logit_stand: bool = False,
    topk_rank: str = "nontarget",
) -> Dict[str, torch.Tensor]:
    """CRLD as DeepKD's three losses ``{"tog", "tcg", "ncg"}`` (formulas in the module docstring).

    Defaults: ``CRLD_DEFAULTS``. ``warmup`` is the already-computed
    warm-up factor; ``topk`` (None, int or per-row LongTensor) masks every NCKD term, its
    classes ranked as ``topk_rank`` says (core.losses.topk_nontarget_mask).
    """
    check_two_views(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong, target)
    check_mask_mode(confidence_mask)
    if split not in ("dkd", "kd"):
        raise ValueError(f"split must be 'dkd' or 'kd', got {split!r}")
    keep_w, keep_s = crld_confidence_masks(logits_teacher_weak, logits_teacher_strong, tau_weak, tau_strong)
    within, cross = _pairs(logits_student_weak, logits_teacher_weak, logits_student_strong, logits_teacher_strong)
    tcg = ncg = 0.0
    for pairs, keep, weight in ((within, keep_w, within_weight), (cross, keep_s, cross_weight)):
        tc_rows = nc_rows = 0.0
        for zs, zt in pairs:
            parts = kd_parts(zs, zt, target, temperature, topk, logit_stand, reduction="none", topk_rank=topk_rank)
            if split == "dkd":
                tc_rows = tc_rows + alpha * parts.tckd
                nc_rows = nc_rows + beta * parts.nckd
            else:
                tc_rows = tc_rows + parts.tckd
                nc_rows = nc_rows + (1.0 - parts.teacher_target_prob) * parts.nckd
        tcg = tcg + weight * masked_reduce(tc_rows, keep, confidence_mask, "mean")
        ncg = ncg + weight * masked_reduce(nc_rows, keep, confidence_mask, "mean")
    return {
        "tog": ce_weight * two_view_cross_entropy(logits_student_weak, logits_student_strong, target),
        "tcg": warmup * tcg,
        "ncg": warmup * ncg,
    }
