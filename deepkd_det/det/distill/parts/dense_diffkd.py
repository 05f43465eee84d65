"""DiffKD on a dense head's outputs (KD.DIFFKD.DENSE_OUTPUTS; RetinaNet): per listed output
("cls": the class-logit maps, "reg": the box-delta maps) and head level, a DiffKD module of kind
"feature" on the raw maps (A*K resp. A*4 channels), binary KL for the sigmoid logits, MSE for the
deltas (docs/diffkd.md "dense-head outputs": the release publishes no form; this one is ours).
Losses ``loss_diffkd_dense_kd`` (KD.DIFFKD.DENSE_WEIGHT), ``loss_diffkd_dense_diff``
(DIFF_WEIGHT), summed over outputs and levels, TOG under DeepKD. Training-only modules
``diffkd_dense.<output>_<level>.*``.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from deepkd_det.core.diffkd import DiffKD as DiffKDModule

from ..heads import dense_head_problem
from .base import DISTILL_PART_REGISTRY, DistillPart

__all__ = ["DenseDiffKD"]

OUTPUTS = {"cls": 0, "reg": 1}


@DISTILL_PART_REGISTRY.register()
class DenseDiffKD(DistillPart):
    order = 50
    name = "dense_diffkd"
    what = "DiffKD modules of the dense head"
    needs = frozenset({"dense_head", "features"})
    module_names = ("diffkd_dense",)

    def __init__(self, modules: nn.ModuleDict, weights: Dict[str, float]):
        self.diffkd_dense = modules
        self.weights = dict(weights)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.KD.DIFFKD.ENABLED) and len(cfg.KD.DIFFKD.DENSE_OUTPUTS) > 0

    @classmethod
    def disable(cls, cfg) -> None:
        cfg.KD.DIFFKD.DENSE_OUTPUTS = []

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg):
            return None
        problem = dense_head_problem(student, teacher)
        if problem:
            raise ValueError(f"KD.DIFFKD.DENSE_OUTPUTS {list(cfg.KD.DIFFKD.DENSE_OUTPUTS)}: {problem}")
        d = cfg.KD.DIFFKD
        anchors = student.anchor_generator.num_cell_anchors
        modules = nn.ModuleDict()
        for out in d.DENSE_OUTPUTS:
            for level, a in zip(student.head_in_features, anchors):
                ch = a * (int(student.num_classes) if out == "cls" else 4)
                modules[f"{out}_{level}"] = DiffKDModule(
                    ch, ch, kind="feature", inference_steps=int(d.INFERENCE_STEPS),
                    kd_loss="bkl" if out == "cls" else "mse")
        return cls(modules, {"kd": d.DENSE_WEIGHT, "diff": d.DIFF_WEIGHT})

    def modules(self):
        return {"diffkd_dense": self.diffkd_dense}

    def losses(self, ctx):
        student_out, teacher_out = ctx.dense, ctx.teacher_dense()
        levels = list(ctx.student.head_in_features)
        totals: Dict[str, torch.Tensor] = {}
        for key, module in self.diffkd_dense.items():
            out, level = key.split("_", 1)
            i, j = OUTPUTS[out], levels.index(level)
            res = module(student_out[i][j], teacher_out[i][j])
            for name, value in res.losses.items():
                totals[name] = totals[name] + value if name in totals else value
        return {"loss_diffkd_dense_kd": self.weights["kd"] * totals["kd"],
                "loss_diffkd_dense_diff": self.weights["diff"] * totals["diff"]}
