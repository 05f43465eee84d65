"""Logit distillation for sigmoid (dense) heads: KD / DKD / DeepKD per anchor and class.

Our extension (DeepKD has no published form for sigmoid heads); docs/maths.md §9 states it.
Per anchor ``a`` and class ``c``: ``p = sigmoid(zt / T)``, ``q = sigmoid(zs / T)`` and
``B_ac = T^2 * BKL(p || q)``. The classes are independent Bernoullis, so the full KD, the sum of
``B_ac`` over classes, splits exactly into a target part (each positive anchor's ground-truth
class) and a non-target part (its other classes, and every class of a negative anchor unless
``negatives="ignore"``), with no coupling factor. DeepKD's top-k mask, ranked by the teacher,
keeps only the ``k`` largest non-target classes of each anchor. Both parts are divided by the
number of positive anchors (as RetinaNet's focal loss) unless a ``normalizer`` is given.

Labels follow detectron2's RetinaNet: ``-1`` ignored anchor, ``0..K-1`` positive anchor of that
class, ``K`` negative (background) anchor. Pure torch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .losses import TopK, topk_nontarget_mask

__all__ = [
    "DENSE_NEGATIVES",
    "binary_kl",
    "dense_kd_components",
    "dense_nontarget_mask",
    "dense_num_nontarget",
]

# What a negative (background) anchor contributes: all its classes as non-target classes, or nothing.
DENSE_NEGATIVES = ("nontarget", "ignore")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Element-wise ``T^2 * BKL(sigmoid(zt/T) || sigmoid(zs/T))``, same shape as the inputs.

    ``BKL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))``, computed with ``logsigmoid`` so that it is
    finite for any logits. Gradient w.r.t. ``zs``: ``T * (q - p)``. The teacher is detached; the
    result is in at least float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    zs = _at_least_float32(student_logits) / temperature
    zt = _at_least_float32(teacher_logits.detach()) / temperature
    log_p, log_1mp = F.logsigmoid(zt), F.logsigmoid(-zt)
    log_q, log_1mq = F.logsigmoid(zs), F.logsigmoid(-zs)
    p = log_p.exp()
    return (p * (log_p - log_q) + (1.0 - p) * (log_1mp - log_1mq)) * temperature**2


def dense_num_nontarget(num_classes: int, negatives: str = "nontarget") -> int:
    """The number of non-target classes the top-k schedule is built over: ``K`` when negative anchors
    count (their K classes are all non-target), ``K - 1`` when they are left out."""
    if negatives not in DENSE_NEGATIVES:
        raise ValueError(f"negatives must be one of {DENSE_NEGATIVES}, got {negatives!r}")
    return int(num_classes) if negatives == "nontarget" else int(num_classes) - 1


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() and (bool((labels < -1).any()) or bool((labels > num_classes).any())):
        raise ValueError(
            f"labels must lie in -1 (ignored), 0..{num_classes - 1} (positive) or {num_classes} (background)"
        )
    return labels


def dense_nontarget_mask(
    teacher_logits: torch.Tensor, labels: torch.Tensor, num_classes: int, topk: TopK = None
) -> torch.Tensor:
    """Boolean ``(N, K)``: the non-target classes of each anchor that the top-k mask keeps.

    Non-target classes: every class but the label (a background label ``K`` has none of the K
    columns, so all K are non-target). With ``topk`` only the ``k`` of them with the largest teacher
    logits are kept (ties: lower class index first); ``k`` at least the anchor's number of
    non-target classes keeps them all. Ignored anchors (``-1``) are treated like background here;
    the caller leaves them out. Reuses :func:`deepkd_det.core.losses.topk_nontarget_mask` on the
    logits with a background column that ranks last and is dropped afterwards.
    """
    n, k_cls = teacher_logits.shape
    target = labels.long().clamp(min=0).masked_fill(labels.long() < 0, num_classes)
    if topk is None:
        return ~F.one_hot(target, k_cls + 1)[:, :k_cls].bool()
    padded = torch.cat(
        [teacher_logits.detach(), teacher_logits.new_full((n, 1), float("-inf"))], dim=1
    )
    return topk_nontarget_mask(padded, target, topk, rank="nontarget")[:, :k_cls]


def dense_kd_components(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    topk: TopK = None,
    negatives: str = "nontarget",
    normalizer: Optional[float] = None,
    warmup: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(target_part, nontarget_part)`` of sigmoid KD/DKD over anchors (docs/maths.md §9).

    ``student_logits``, ``teacher_logits``: ``(N_anchors, K)`` raw classification logits of a dense
    head, flattened over images, levels and anchors (the same anchors in the same order for both).
    ``labels``: ``(N_anchors,)`` in ``{-1 ignore, 0..K-1 positive class, K background}``.

        target_part    = warmup * alpha / M * sum_{positive a} B[a, y_a]
        nontarget_part = warmup * beta  / M * sum_{counted a} sum_{kept c != y_a} B[a, c]

    with ``B = binary_kl(zs, zt, T)`` (already times ``T^2``). Counted anchors: the positives, and the
    negatives when ``negatives="nontarget"`` (default; ``"ignore"`` leaves them out); ignored anchors
    never count. Kept classes: all non-target classes, or with ``topk`` the ``k`` the teacher ranks
    highest (an int, or one value per anchor). ``M = normalizer`` if given (e.g. detectron2's moving
    average of the positive count), else ``max(1, number of positive anchors)``.
    KD is ``alpha = beta = 1`` with no ``topk``: then the sum of the parts is the full binary-KL sum / M.
    Gradients flow to ``student_logits`` only.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (N_anchors, K), got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    n, k_cls = student_logits.shape
    if k_cls != int(num_classes):
        raise ValueError(f"logits have {k_cls} classes, num_classes is {num_classes}")
    if negatives not in DENSE_NEGATIVES:
        raise ValueError(f"negatives must be one of {DENSE_NEGATIVES}, got {negatives!r}")
    if normalizer is not None and not float(normalizer) > 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    labels = _check_labels(labels.to(student_logits.device), n, k_cls)

    positive = (labels >= 0) & (labels < k_cls)
    counted = positive | (labels == k_cls) if negatives == "nontarget" else positive
    if normalizer is None:
        normalizer = max(1.0, float(positive.sum().item()))

    bkl = binary_kl(student_logits, teacher_logits, temperature)
    target_onehot = F.one_hot(labels.clamp(min=0), k_cls + 1)[:, :k_cls].bool() & positive[:, None]
    keep = dense_nontarget_mask(teacher_logits, labels, k_cls, topk) & counted[:, None]
    zero = torch.zeros_like(bkl)
    # torch.where, not a product: a masked entry's gradient is exactly zero.
    target_sum = torch.where(target_onehot, bkl, zero).sum()
    nontarget_sum = torch.where(keep, bkl, zero).sum()
    scale = float(warmup) / float(normalizer)
    return scale * alpha * target_sum, scale * beta * nontarget_sum
