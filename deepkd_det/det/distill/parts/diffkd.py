"""DiffKD (Huang et al., NeurIPS 2023) on FPN levels: per level a DiffKD module maps the student's
map to the teacher's channels, denoises it with a diffusion model trained on the teacher's map of
that level, and compares the two. Losses ``loss_diffkd_kd`` (LOSS_WEIGHT), ``loss_diffkd_diff``
(DIFF_WEIGHT) and, with an autoencoder, ``loss_diffkd_ae`` (AE_WEIGHT), each summed over the
levels; all TOG under DeepKD. KD.DIFFKD.ATTENTION: the attention-weighted MSE (the paper's dagger
rows; ``deepkd_det.core.diffkd.attention_weighted_mse``) instead of the MSE. One module per
level, not one shared: the levels' statistics differ (the denoiser and adapter have batch norms,
and the diffusion model learns one distribution) and the channels need not agree across levels;
training-only, state-dict keys ``diffkd.<level>.*``. Levels pair by stride.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from deepkd_det.core.diffkd import DiffKD as DiffKDModule

from .base import DISTILL_PART_REGISTRY, DistillPart
from .levels import check_padding, pair_levels

__all__ = ["DiffKD"]


@DISTILL_PART_REGISTRY.register()
class DiffKD(DistillPart):
    order = 40
    name = "diffkd"
    what = "DiffKD modules"
    module_names = ("diffkd",)
    needs = frozenset({"features"})

    def __init__(self, modules: nn.ModuleDict, levels: Dict[str, str], weights: Dict[str, float]):
        self.diffkd = modules
        self.levels = dict(levels)
        self.weights = dict(weights)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return bool(cfg.KD.DIFFKD.ENABLED)

    @classmethod
    def disable(cls, cfg) -> None:
        cfg.KD.DIFFKD.ENABLED = False

    @classmethod
    def from_config(cls, cfg, student, teacher):
        if not cls.enabled(cfg):
            return None
        d = cfg.KD.DIFFKD
        names = list(d.IN_FEATURES)
        s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
        levels = pair_levels("KD.DIFFKD.IN_FEATURES", names, s_shapes, t_shapes)
        check_padding("KD.DIFFKD", student.backbone, teacher.backbone)
        ae = int(d.AE_CHANNELS) or None
        modules = nn.ModuleDict({
            n: DiffKDModule(s_shapes[n].channels, t_shapes[levels[n]].channels, kind="feature",
                            inference_steps=int(d.INFERENCE_STEPS), ae_channels=ae,
                            kd_loss="attention_mse" if d.ATTENTION else "mse")
            for n in names
        })
        return cls(modules, levels, {"diff": d.DIFF_WEIGHT, "ae": d.AE_WEIGHT, "kd": d.LOSS_WEIGHT})

    def modules(self):
        return {"diffkd": self.diffkd}

    def level_losses(self, student_features, teacher_features) -> Dict[str, torch.Tensor]:
        """Unweighted ``{"diff", "ae", "kd"}``, each summed over the levels (one DiffKD pass per
        level, in the ModuleDict's order, so the random draws come in a fixed order)."""
        totals: Dict[str, torch.Tensor] = {}
        for name, module in self.diffkd.items():
            out = module(student_features[name], teacher_features[self.levels[name]])
            for key, value in out.losses.items():
                totals[key] = totals[key] + value if key in totals else value
        return totals

    def feature_losses(self, student_features, teacher_features) -> Dict[str, torch.Tensor]:
        raw = self.level_losses(student_features, teacher_features)
        w = self.weights
        out = {"loss_diffkd_kd": w["kd"] * raw["kd"], "loss_diffkd_diff": w["diff"] * raw["diff"]}
        if any(m.autoencoder is not None for m in self.diffkd.values()):
            out["loss_diffkd_ae"] = w["ae"] * raw["ae"]
        return out

    def losses(self, ctx):
        return self.feature_losses(ctx.student_features, ctx.teacher_features())
