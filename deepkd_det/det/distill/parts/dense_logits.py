"""Logit KD / DKD / DeepKD on a dense sigmoid head (KD.DENSE; RetinaNet): our extension.

Per anchor and class the binary KL at temperature T between the teacher's and the student's
sigmoid outputs, split into the target part (each positive anchor's ground-truth class:
``loss_dense_tckd``, DeepKD's TCG) and the non-target part (the other classes of the anchor, and
with KD.DENSE.NEGATIVES "nontarget" every class of a negative anchor, masked to the teacher's top
k under DEEPKD.TOPK: ``loss_dense_nckd``, NCG), normalised by the batch's positive anchors
(``deepkd_det.core.dense_kd``; docs/maths.md "Sigmoid heads"). Anchors and labels are the
student's own (its anchor generator and matcher); teacher and student must have the same anchors
per location and the same head levels.
"""

from __future__ import annotations

from detectron2.utils.events import get_event_storage

from deepkd_det.core.dense_kd import dense_kd_components, dense_num_nontarget
from deepkd_det.core.losses import warmup_factor
from deepkd_det.core.settings import build_topk_schedule

from ..heads import dense_head_problem
from .base import DISTILL_PART_REGISTRY, DistillPart
from .dense import anchor_labels, flatten_levels

__all__ = ["DenseLogitKD"]


@DISTILL_PART_REGISTRY.register()
class DenseLogitKD(DistillPart):
    order = 20
    name = "dense_logits"
    # the features tap gives the student's padded size: the teacher runs on the same padded batch
    needs = frozenset({"dense_head", "features"})

    def __init__(self, *, num_classes: int, temperature: float = 1.0, alpha: float = 1.0, beta: float = 1.0,
                 weight: float = 1.0, negatives: str = "nontarget", warmup_iters: int = 0, topk_schedule=None):
        self.num_classes = int(num_classes)
        self.temperature, self.alpha, self.beta, self.weight = temperature, alpha, beta, weight
        self.negatives, self.warmup_iters = negatives, warmup_iters
        self.topk_schedule = topk_schedule

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.KD.DENSE.TYPE != "NONE"

    @classmethod
    def disable(cls, cfg) -> None:
        cfg.KD.DENSE.TYPE = "NONE"

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg):
            return None
        problem = dense_head_problem(student, teacher)
        if problem:
            raise ValueError(f"KD.DENSE.TYPE {cfg.KD.DENSE.TYPE!r} (logits of a dense head): {problem}")
        d = cfg.KD.DENSE
        dkd = d.TYPE == "DKD"
        k = int(student.num_classes)
        return cls(num_classes=k, temperature=d.TEMPERATURE, alpha=d.ALPHA if dkd else 1.0,
                   beta=d.BETA if dkd else 1.0, weight=d.LOSS_WEIGHT, negatives=d.NEGATIVES,
                   warmup_iters=cfg.KD.WARMUP_ITERS,
                   topk_schedule=build_topk_schedule(cfg.DEEPKD, dense_num_nontarget(k, d.NEGATIVES)))

    def components(self):
        return {"loss_dense_tckd": "tcg", "loss_dense_nckd": "ncg"}

    def losses(self, ctx):
        k = self.num_classes
        s_cls = flatten_levels(ctx.dense[0], k)
        t_cls = flatten_levels(ctx.teacher_dense()[0], k)
        labels, num_pos = anchor_labels(ctx.student, ctx.dense[0], ctx.batched_inputs)
        num_nontarget = dense_num_nontarget(k, self.negatives)
        kk = self.topk_schedule(ctx.progress) if self.topk_schedule is not None else num_nontarget
        get_event_storage().put_scalar("kd/topk_k", float(kk), smoothing_hint=False)
        tckd, nckd = dense_kd_components(
            s_cls, t_cls, labels, k, temperature=self.temperature, alpha=self.weight * self.alpha,
            beta=self.weight * self.beta, topk=None if kk >= num_nontarget else kk, negatives=self.negatives,
            warmup=warmup_factor(ctx.iter, self.warmup_iters),
        )
        return {"loss_dense_tckd": tckd, "loss_dense_nckd": nckd}
