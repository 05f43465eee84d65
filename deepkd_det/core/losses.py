"""Decoupled logit-distillation losses (TCKD / NCKD) with the dynamic top-k mask.

Every formula of the project lives here once; detection and classification call these
functions and never re-derive a loss. Pure torch.

Notation (docs/maths.md): student logits ``zs``, teacher logits ``zt`` (N x C), labels ``y``,
temperature ``T``. ``b = [p_y, 1 - p_y]`` is the binary target distribution and ``q`` the
distribution over the non-target classes (optionally only the top-K of them, ranked by the
teacher). Per row, ``KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t[y]) KL(q_t || q_s)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

TopK = Union[None, int, torch.Tensor]

# How the top-k mask ranks classes: "nontarget" (the paper: the K non-target classes the
# teacher ranks highest) or "all" (the released DeepKD code: the teacher's top K over all
# classes, target included, minus the target; see topk_nontarget_mask).
TOPK_RANKS = ("nontarget", "all")

__all__ = [
    "TOPK_RANKS",
    "KDParts",
    "kd_parts",
    "kd_components",
    "dkd_components",
    "kd_loss",
    "standardize_logits",
    "topk_nontarget_mask",
    "warmup_factor",
]


@dataclass
class KDParts:
    """The two decoupled KD terms, each already multiplied by ``T**2`` (not by alpha/beta).

    ``tckd`` and ``nckd`` are scalars (``reduction="mean"``) or shape ``(N,)`` (``"none"``);
    ``teacher_target_prob`` is ``p_t[y]`` per row, shape ``(N,)``, without gradient.
    """

    tckd: torch.Tensor
    nckd: torch.Tensor
    teacher_target_prob: torch.Tensor


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation ("logit standardization KD"): ``(z - mean) / (std + eps)`` per row."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def _as_row_k(topk: TopK, n: int, device, no_mask_from: int) -> Optional[torch.Tensor]:
    """Normalise ``topk`` to a per-row LongTensor, or None when no class is removed.

    ``no_mask_from`` is the smallest K that keeps every non-target class of every row.
    """
    if topk is None:
        return None
    if isinstance(topk, torch.Tensor):
        if topk.dim() == 0:
            topk = int(topk.item())
        else:
            k = topk.to(device=device, dtype=torch.long).reshape(-1)
            if k.numel() != n:
                raise ValueError(f"per-row topk has {k.numel()} entries for {n} rows")
            if bool((k < 1).any()):
                raise ValueError("topk must keep at least one non-target class (K >= 1)")
            if bool((k >= no_mask_from).all()):
                return None
            return k
    k = int(topk)
    if k < 1:
        raise ValueError(f"topk must keep at least one non-target class, got K={k}")
    if k >= no_mask_from:
        return None
    return torch.full((n,), k, dtype=torch.long, device=device)


def topk_nontarget_mask(
    logits_teacher: torch.Tensor, target: torch.Tensor, topk: TopK, rank: str = "nontarget"
) -> torch.Tensor:
    """Boolean ``(N, C)`` mask of the classes NCKD keeps; the same mask serves teacher and student.

    ``rank="nontarget"`` (the paper, default): the non-target classes are ranked by the
    teacher's logits and the top K kept; the target is never kept; ``K >= C - 1`` keeps all.
    ``rank="all"`` (the released DeepKD code): all C classes are ranked, target included, the
    top K kept and the target then removed, so a row whose target the teacher ranks inside its
    top K keeps only K - 1 non-target classes, and ``K >= C`` keeps all. When that leaves
    nothing (K = 1, target ranked first) the release's softmax runs over every class shifted
    alike, i.e. NCKD becomes full KD over all C classes: such a row's mask is all True.
    """
    if rank not in TOPK_RANKS:
        raise ValueError(f"topk rank must be one of {TOPK_RANKS}, got {rank!r}")
    n, c = logits_teacher.shape
    target_onehot = F.one_hot(target.long(), c).bool()
    k = _as_row_k(topk, n, logits_teacher.device, no_mask_from=c - 1 if rank == "nontarget" else c)
    if k is None:
        return ~target_onehot
    ranked = logits_teacher.detach()
    if rank == "nontarget":
        ranked = ranked.masked_fill(target_onehot, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(c, device=order.device).expand(n, c))
    keep = (position < k[:, None]) & ~target_onehot
    if rank == "all":
        keep = keep | ~keep.any(dim=1, keepdim=True)  # the release's empty set: every class
    return keep


def _kl_over(log_p_t: torch.Tensor, log_p_s: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Row-wise ``sum_j p_t (log p_t - log p_s)`` over the kept entries.

    Removed entries hold -inf log-probabilities; they are replaced by 0 *before* the product so
    that neither the value nor the gradient ever sees ``0 * inf``.
    """
    if keep is not None:
        log_p_t = torch.where(keep, log_p_t, torch.zeros_like(log_p_t))
        log_p_s = torch.where(keep, log_p_s, torch.zeros_like(log_p_s))
        p_t = torch.where(keep, log_p_t.exp(), torch.zeros_like(log_p_t))
    else:
        p_t = log_p_t.exp()
    return (p_t * (log_p_t - log_p_s)).sum(dim=1)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _prepare(logits_student, logits_teacher, target, temperature, logit_stand):
    if logits_student.shape != logits_teacher.shape or logits_student.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be N x C, got {tuple(logits_student.shape)} "
            f"and {tuple(logits_teacher.shape)}"
        )
    if target.shape != logits_student.shape[:1]:
        raise ValueError(f"target must have shape (N,), got {tuple(target.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    # Work in at least float32: the log-space terms below lose everything in float16/bfloat16.
    zs = _at_least_float32(logits_student)
    zt = _at_least_float32(logits_teacher.detach())
    if logit_stand:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    return zs / temperature, zt / temperature


def kd_parts(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    topk: TopK = None,
    logit_stand: bool = False,
    reduction: str = "mean",
    topk_rank: str = "nontarget",
) -> KDParts:
    """TCKD and NCKD (times ``T**2``) and the teacher's target probability.

    ``topk`` is None (all non-target classes), an int, or a LongTensor of per-row K: only the K
    non-target classes the teacher ranks highest enter NCKD, for teacher and student alike;
    ``topk_rank`` says how they are ranked (:func:`topk_nontarget_mask`).
    TCKD is never masked. Gradients flow to ``logits_student`` only.
    """
    zs, zt = _prepare(logits_student, logits_teacher, target, temperature, logit_stand)
    n, c = zs.shape
    y = target.long().view(-1, 1)
    target_onehot = F.one_hot(target.long(), c).bool()

    # Binary distribution [p_y, 1 - p_y] in log space: log(1 - p_y) = lse(z_{!=y}) - lse(z),
    # exact and free of underflow even when p_y rounds to 1.
    lse_s = zs.logsumexp(dim=1)
    lse_t = zt.logsumexp(dim=1)
    zs_nt = zs.masked_fill(target_onehot, float("-inf"))
    zt_nt = zt.masked_fill(target_onehot, float("-inf"))
    log_bs = torch.stack([zs.gather(1, y).squeeze(1) - lse_s, zs_nt.logsumexp(dim=1) - lse_s], dim=1)
    log_bt = torch.stack([zt.gather(1, y).squeeze(1) - lse_t, zt_nt.logsumexp(dim=1) - lse_t], dim=1)
    tckd = _kl_over(log_bt, log_bs, None)

    # Non-target distribution over the kept classes (target and masked classes removed).
    mask = topk_nontarget_mask(zt, target, topk, topk_rank)
    log_qs = zs.masked_fill(~mask, float("-inf")).log_softmax(dim=1)
    log_qt = zt.masked_fill(~mask, float("-inf")).log_softmax(dim=1)
    nckd = _kl_over(log_qt, log_qs, mask)

    t2 = temperature**2
    return KDParts(
        tckd=_reduce(tckd * t2, reduction),
        nckd=_reduce(nckd * t2, reduction),
        teacher_target_prob=log_bt[:, 0].exp().detach(),
    )


def kd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    temperature: float = 1.0,
    logit_stand: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Classical KD: ``T**2 * KL(p_t || p_s)`` per row (Hinton et al.)."""
    dummy_target = torch.zeros(logits_student.shape[0], dtype=torch.long, device=logits_student.device)
    zs, zt = _prepare(logits_student, logits_teacher, dummy_target, temperature, logit_stand)
    kl = _kl_over(zt.log_softmax(dim=1), zs.log_softmax(dim=1), None)
    return _reduce(kl * temperature**2, reduction)


def warmup_factor(progress: float, warmup: float) -> float:
    """Linear warm-up of the distillation terms: ``min(progress / warmup, 1)`` (1 when warmup <= 0)."""
    if warmup <= 0:
        return 1.0
    return float(min(max(progress, 0.0) / warmup, 1.0))


def dkd_components(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    warmup: float = 1.0,
    topk: TopK = None,
    logit_stand: bool = False,
    topk_rank: str = "nontarget",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DKD's two terms as DeepKD's (TCG, NCG) losses: ``w*alpha*TCKD``, ``w*beta*NCKD``.

    ``warmup`` is the already-computed warm-up factor ``w`` (see :func:`warmup_factor`).
    Plain DKD is the sum of the two.
    """
    parts = kd_parts(logits_student, logits_teacher, target, temperature, topk, logit_stand, topk_rank=topk_rank)
    return warmup * alpha * parts.tckd, warmup * beta * parts.nckd


def kd_components(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    weight: float = 1.0,
    topk: TopK = None,
    logit_stand: bool = False,
    coupling: str = "row",
    topk_rank: str = "nontarget",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """KD split into DeepKD's (TCG, NCG) losses.

    ``coupling="row"`` (paper, exact): ``mean_i TCKD_i`` and ``mean_i (1 - p_t[y]_i) NCKD_i``;
    with no mask their sum is exactly :func:`kd_loss`. ``coupling="batch"`` reproduces the
    released reference code: ``mean_i(1 - p_t[y]_i) * mean_i NCKD_i``.
    """
    parts = kd_parts(logits_student, logits_teacher, target, temperature, topk, logit_stand, reduction="none",
                     topk_rank=topk_rank)
    not_target = 1.0 - parts.teacher_target_prob
    if coupling == "row":
        ncg = (not_target * parts.nckd).mean()
    elif coupling == "batch":
        ncg = not_target.mean() * parts.nckd.mean()
    else:
        raise ValueError(f"coupling must be 'row' or 'batch', got {coupling!r}")
    return weight * parts.tckd.mean(), weight * ncg
