"""Box-regression KD on the R-CNN box head (KD.DIFFKD.REG_WEIGHT, with KD.DIFFKD on): the
student's deltas pulled to the teacher's on the same sampled boxes
(R-CNN students only; a dense student's regression outputs are KD.DIFFKD.DENSE_OUTPUTS "reg")
(``deepkd_det.core.boxkd.box_regression_kd_loss``), ``loss_regkd``, TOG under DeepKD."""

from __future__ import annotations

from deepkd_det.core.boxkd import box_regression_kd_loss

from ..heads import rcnn_pairing_problem
from .base import DISTILL_PART_REGISTRY, DistillPart

__all__ = ["BoxRegressionKD"]


@DISTILL_PART_REGISTRY.register()
class BoxRegressionKD(DistillPart):
    order = 60
    name = "regkd"
    needs = frozenset({"box_head"})

    def __init__(self, weight: float, num_classes: int):
        self.weight = float(weight)
        self.num_classes = int(num_classes)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.KD.DIFFKD.ENABLED) and cfg.KD.DIFFKD.REG_WEIGHT > 0

    @classmethod
    def disable(cls, cfg) -> None:
        cfg.KD.DIFFKD.REG_WEIGHT = 0.0

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg) or not hasattr(student, "roi_heads"):
            return None  # a dense student's regression outputs: KD.DIFFKD.DENSE_OUTPUTS "reg"
        problem = rcnn_pairing_problem(student, teacher)
        if problem:
            raise ValueError(f"KD.DIFFKD.REG_WEIGHT (box-regression KD on the R-CNN box head): {problem}")
        return cls(cfg.KD.DIFFKD.REG_WEIGHT, student.roi_heads.num_classes)

    def losses(self, ctx):
        _, teacher_deltas = ctx.teacher_box()
        return {"loss_regkd": self.weight * box_regression_kd_loss(
            ctx.box.deltas, teacher_deltas, ctx.box.labels, self.num_classes)}
