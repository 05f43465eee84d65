"""Logit KD / DKD / DeepKD on the R-CNN box head (KD.TYPE; DEEPKD for the top-k mask).

The student's box head classified its sampled proposals; the teacher's box head classifies the
very same boxes on its own features, and the TCKD / NCKD terms come from
``deepkd_det.core.losses`` with labels = the proposals' gt_classes (background = NUM_CLASSES,
the last index). ``loss_tckd`` feeds DeepKD's TCG, ``loss_nckd`` its NCG.
"""

from __future__ import annotations

from typing import Dict

import torch
from detectron2.utils.events import get_event_storage

from deepkd_det.core.losses import dkd_components, kd_components, warmup_factor
from deepkd_det.core.settings import topk_rank
from deepkd_det.det.config import build_topk_schedule

from ..heads import rcnn_pairing_problem
from .base import DISTILL_PART_REGISTRY, DistillPart

__all__ = ["RCNNLogitKD"]


@DISTILL_PART_REGISTRY.register()
class RCNNLogitKD(DistillPart):
    order = 10
    name = "logits"
    needs = frozenset({"box_head"})

    def __init__(self, *, kd_type: str, alpha: float = 1.0, beta: float = 0.25, temperature: float = 1.0,
                 kd_weight: float = 1.0, warmup_iters: int = 0, logit_stand: bool = False, coupling: str = "row",
                 topk_schedule=None, topk_rank: str = "nontarget"):
        self.kd_type = kd_type
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.kd_weight, self.warmup_iters = kd_weight, warmup_iters
        self.logit_stand, self.coupling = logit_stand, coupling
        self.topk_schedule = topk_schedule
        self.topk_rank = topk_rank  # DEEPKD.TOPK.RANK as resolved by core.settings.topk_rank

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.KD.TYPE != "NONE"

    @classmethod
    def disable(cls, cfg) -> None:
        cfg.KD.TYPE = "NONE"

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg):
            return None
        problem = rcnn_pairing_problem(student, teacher)
        if problem:
            raise ValueError(f"KD.TYPE {cfg.KD.TYPE!r} (logits of the R-CNN box head): {problem}")
        kd = cfg.KD
        return cls(kd_type=kd.TYPE, alpha=kd.ALPHA, beta=kd.BETA, temperature=kd.TEMPERATURE,
                   kd_weight=kd.KD_WEIGHT, warmup_iters=kd.WARMUP_ITERS, logit_stand=kd.LOGIT_STAND,
                   coupling=kd.COUPLING, topk_schedule=build_topk_schedule(cfg), topk_rank=topk_rank(cfg.DEEPKD))

    def components(self):
        return {"loss_tckd": "tcg", "loss_nckd": "ncg"}

    def losses(self, ctx) -> Dict[str, torch.Tensor]:
        student_logits, labels = ctx.box.scores, ctx.box.labels
        teacher_logits, _ = ctx.teacher_box()
        return self.logit_losses(student_logits, teacher_logits, labels, ctx.iter, ctx.progress)

    def logit_losses(self, student_logits, teacher_logits, labels, iteration: int, progress: float):
        """Weighted TCKD / NCKD of the student's box logits against the teacher's on the same boxes."""
        if labels.numel() != student_logits.shape[0]:
            raise RuntimeError(f"{labels.numel()} sampled labels for {student_logits.shape[0]} logits")
        if teacher_logits.shape != student_logits.shape:
            raise RuntimeError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ; teacher and student must have the same classes"
            )
        storage = get_event_storage()
        num_nontarget = student_logits.shape[1] - 1
        # No schedule (DeepKD off or DEEPKD.TOPK.MODE off): every non-target class is kept.
        k = self.topk_schedule(progress) if self.topk_schedule is not None else num_nontarget
        topk = None if k >= num_nontarget else k
        storage.put_scalar("kd/topk_k", float(k), smoothing_hint=False)
        warm = warmup_factor(iteration, self.warmup_iters)
        if student_logits.shape[0] == 0:
            zero = student_logits.sum() * 0.0
            return {"loss_tckd": zero, "loss_nckd": zero}
        if self.kd_type == "DKD":
            tckd, nckd = dkd_components(
                student_logits, teacher_logits, labels, alpha=self.alpha, beta=self.beta,
                temperature=self.temperature, warmup=warm, topk=topk, logit_stand=self.logit_stand,
                topk_rank=self.topk_rank,
            )
        else:
            tckd, nckd = kd_components(
                student_logits, teacher_logits, labels, temperature=self.temperature,
                weight=self.kd_weight * warm, topk=topk, logit_stand=self.logit_stand,
                coupling=self.coupling, topk_rank=self.topk_rank,
            )
        return {"loss_tckd": tckd, "loss_nckd": nckd}
