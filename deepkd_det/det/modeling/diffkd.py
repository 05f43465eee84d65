"""DiffKD feature distillation in the detector: one DiffKD module per FPN level, built from cfg.

Per level (``cfg.KD.DIFFKD.IN_FEATURES``) a ``deepkd_det.core.diffkd.DiffKD`` of kind "feature"
maps the student's map to the teacher's channels, denoises it with a diffusion model trained on
the teacher's map of that level, and compares the two (MSE). One module per level rather than
one shared: the levels' statistics differ (the denoiser and adapter have batch norms, and the
diffusion model learns one distribution), the channels need not agree across a student's levels
in general, and the extra parameters are training-only. The modules live in
``DeepKDRCNN.diffkd`` (an ``nn.ModuleDict``; state-dict keys ``diffkd.<level>.*``,
``deepkd_det.core.diffkd.DIFFKD_PREFIX``): trained with the student (detectron2's param groups
include them), kept in training checkpoints, never used at inference.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from deepkd_det.core.diffkd import DIFFKD_PREFIX, DiffKD

from .reviewkd import check_shared_features

__all__ = ["DIFFKD_PREFIX", "build_diffkd_modules", "check_diffkd_features", "diffkd_level_losses"]


def check_diffkd_features(
    names, student_shapes: Mapping[str, ShapeSpec], teacher_shapes: Mapping[str, ShapeSpec]
) -> None:
    """``check_shared_features`` for KD.DIFFKD.IN_FEATURES."""
    check_shared_features("KD.DIFFKD.IN_FEATURES", names, student_shapes, teacher_shapes)


def build_diffkd_modules(cfg, student_backbone, teacher_backbone) -> nn.ModuleDict:
    """``{level: DiffKD(student channels -> teacher channels)}`` for cfg.KD.DIFFKD."""
    d = cfg.KD.DIFFKD
    names = list(d.IN_FEATURES)
    s_shapes, t_shapes = student_backbone.output_shape(), teacher_backbone.output_shape()
    check_diffkd_features(names, s_shapes, t_shapes)
    s_div, t_div = int(student_backbone.size_divisibility), int(teacher_backbone.size_divisibility)
    if t_div > 1 and (s_div < 1 or s_div % t_div):
        raise ValueError(
            f"DiffKD runs the teacher on the student's padded images: the student's size divisibility "
            f"({s_div}) must be a multiple of the teacher's ({t_div})"
        )
    ae = int(d.AE_CHANNELS) or None
    return nn.ModuleDict({
        n: DiffKD(s_shapes[n].channels, t_shapes[n].channels, kind="feature",
                  inference_steps=int(d.INFERENCE_STEPS), ae_channels=ae)
        for n in names
    })


def diffkd_level_losses(
    modules: nn.ModuleDict, student_features: Mapping[str, torch.Tensor], teacher_features: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Unweighted ``{"diff", "ae", "kd"}``, each summed over the levels (one DiffKD pass per level,
    in the ModuleDict's order, so the random draws come in a fixed order)."""
    totals: Dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        out = module(student_features[name], teacher_features[name])
        for key, value in out.losses.items():
            totals[key] = totals[key] + value if key in totals else value
    return totals
