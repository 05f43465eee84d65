"""ReviewKD (Chen et al., CVPR 2021) on the FPN: a trained review head maps the student's levels
to the teacher's channels, compared by the hierarchical context loss (``loss_reviewkd``, TOG
under DeepKD). The head (``deepkd_det.core.reviewkd.ReviewKDHead``) is training-only, state-dict
keys ``reviewkd_head.*`` (the release's ``kd_trans.*`` load through
``deepkd_det.det.modeling.reviewkd.release_head_keys_to_ours``). Levels pair by stride
(``levels.pair_levels``), so the teacher may be of another family.
"""

from __future__ import annotations

from typing import Dict

import torch

from deepkd_det.core.reviewkd import HCL_LEVELS, ReviewKDHead, hcl_loss

from .base import DISTILL_PART_REGISTRY, DistillPart
from .levels import check_padding, pair_levels

__all__ = ["ReviewKD"]


@DISTILL_PART_REGISTRY.register()
class ReviewKD(DistillPart):
    order = 30
    name = "reviewkd"
    what = "ReviewKD head"
    module_names = ("reviewkd_head",)
    needs = frozenset({"features"})

    def __init__(self, head: ReviewKDHead, levels: Dict[str, str], weight: float = 1.0, hcl_levels=HCL_LEVELS):
        self.head = head
        self.levels = dict(levels)  # student level -> teacher level, finest first
        self.weight = float(weight)
        self.hcl_levels = tuple(hcl_levels)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.KD.REVIEWKD.ENABLED)

    @classmethod
    def disable(cls, cfg) -> None:
        cfg.KD.REVIEWKD.ENABLED = False

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg):
            return None
        r = cfg.KD.REVIEWKD
        names = list(r.IN_FEATURES)
        s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
        levels = pair_levels("KD.REVIEWKD.IN_FEATURES", names, s_shapes, t_shapes)
        strides = [s_shapes[n].stride for n in names]
        if any(a >= b for a, b in zip(strides, strides[1:])):
            raise ValueError(
                f"KD.REVIEWKD.IN_FEATURES {names} must go finest first (strictly increasing strides), got strides {strides}"
            )
        check_padding("KD.REVIEWKD", student.backbone, teacher.backbone)
        head = ReviewKDHead(
            [s_shapes[n].channels for n in names],
            out_channels=[t_shapes[levels[n]].channels for n in names],
            mid_channels=int(r.MID_CHANNELS),
            norm="BN",
        )
        return cls(head, levels, r.LOSS_WEIGHT, [int(v) for v in r.HCL_LEVELS])

    def modules(self):
        return {"reviewkd_head": self.head}

    def feature_loss(self, student_features, teacher_features) -> torch.Tensor:
        """LOSS_WEIGHT * HCL(review head(student levels), teacher levels), finest first."""
        reviewed = self.head([student_features[n] for n in self.levels])
        return self.weight * hcl_loss(reviewed, [teacher_features[t] for t in self.levels.values()], self.hcl_levels)

    def losses(self, ctx):
        return {"loss_reviewkd": self.feature_loss(ctx.student_features, ctx.teacher_features())}
