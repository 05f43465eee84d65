"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021): ABF + HCL, for detection and classification.

The student's FPN levels go through a review path of attention-based fusion modules (ABF) from
the coarsest level to the finest: each level is projected to ``mid_channels`` and fused with the
(upsampled) fused result of the next coarser level, with two spatial attention maps predicted
from both; a 3x3 conv then maps it to the teacher's channel count. The outputs are compared with
the teacher's FPN levels by the hierarchical context loss (HCL).

Detection settings of the ReviewKD release (``Detection/`` of dvlab-research/ReviewKD, and the
same in mdistiller's ``detection/``): all five FPN outputs ``p2..p6`` of student and teacher
(256 channels each), ``mid_channels = 256``, ``out_channels = 256``, loss weight 1.0 for
R101 -> R50 (the default), 1.2 for R101 -> R18, 2.0 for R50 -> MobileNetV2; the loss is added
to the detector's losses without warm-up.

Feature lists are ordered **finest first** (``p2, p3, ..., p6``, the order of detectron2's FPN
output dict); :class:`ReviewKDHead` returns its outputs in the same order.

Classification (the ReviewKD paper's CIFAR-100 / ImageNet method, as in its release and in
mdistiller; deepkd_det/cls/distillers/reviewkd.py) uses the same two pieces: the levels are the
network's stage outputs (finest first) followed by the globally pooled feature as a 1 x 1 map,
``mid_channels`` is one width for all levels, and where a student level's size differs from the
teacher's (``out_sizes``), the fused map is resized (nearest) to the teacher's size before the
output conv, and that resized map is what the next finer level fuses with (mdistiller's
``out_shape``). HCL is the same function for both tasks.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ABF",
    "HCL_LEVELS",
    "REVIEWKD_DET_FEATURES",
    "REVIEWKD_DET_LOSS_WEIGHTS",
    "ReviewKDHead",
    "hcl_loss",
]

REVIEWKD_DET_FEATURES = ("p2", "p3", "p4", "p5", "p6")
# Teacher -> student pair of the release configs -> REVIEWKD_LOSS_WEIGHT.
REVIEWKD_DET_LOSS_WEIGHTS = {"R101-R50": 1.0, "R101-R18": 1.2, "R50-MV2": 2.0}
HCL_LEVELS = (4, 2, 1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'BN' or 'none', got {kind!r}")


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused result of the coarser level.

    ``x`` (N, in, H, W) -> 1x1 conv + norm -> ``f`` (N, mid, H, W). With ``fuse``, the coarser
    fused map ``residual`` (N, mid, h, w) is upsampled (nearest) to (H, W), two sigmoid maps
    ``a = sigmoid(conv1x1([f, r]))`` (N, 2, H, W) weigh them: ``f = f * a0 + r * a1``.
    Returns ``(conv3x3 + norm)(f)`` (N, out, H, W), compared with the teacher, and ``f``, passed on
    to the next finer level.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, norm: str = "BN"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("mid_channels", mid_channels),
                            ("out_channels", out_channels)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.fuse = bool(fuse)
        self.mid_channels = int(mid_channels)
        self.lateral = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), _norm(norm, mid_channels))
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), _norm(norm, out_channels)
        )
        self.attention = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if self.fuse else None
        )
        # Kaiming-uniform with a = 1 on both convs, as the release initialises them.
        nn.init.kaiming_uniform_(self.lateral[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, out_size: Optional[Tuple[int, int]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        fused = self.lateral(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("this ABF fuses with the coarser level: pass its fused map as `residual`")
            if residual.shape[:2] != fused.shape[:2]:
                raise ValueError(
                    f"residual has shape {tuple(residual.shape)}; expected N={fused.shape[0]} and "
                    f"{self.mid_channels} channels"
                )
            residual = F.interpolate(residual, size=fused.shape[-2:], mode="nearest")
            att = self.attention(torch.cat([fused, residual], dim=1))
            fused = fused * att[:, 0:1] + residual * att[:, 1:2]
        elif residual is not None:
            raise ValueError("this ABF is the coarsest level and takes no residual")
        if out_size is not None and tuple(fused.shape[-2:]) != tuple(out_size):
            fused = F.interpolate(fused, size=tuple(out_size), mode="nearest")
        return self.output(fused), fused


class ReviewKDHead(nn.Module):
    """Maps student FPN levels (finest first) to features to compare with the teacher's levels.

    ``in_channels_list``: student channels per level, finest first. ``out_channels``: teacher
    channels, one int for all levels or one per level. The coarsest level has no fusion; each
    finer level fuses with the fused map of the level above it (the review path).
    """

    def __init__(
        self,
        in_channels_list: Sequence[int],
        out_channels: Union[int, Sequence[int]] = 256,
        mid_channels: int = 256,
        norm: str = "BN",
    ):
        super().__init__()
        in_channels_list = [int(c) for c in in_channels_list]
        if not in_channels_list:
            raise ValueError("in_channels_list must name at least one feature level")
        if isinstance(out_channels, int):
            out_list = [out_channels] * len(in_channels_list)
        else:
            out_list = [int(c) for c in out_channels]
            if len(out_list) != len(in_channels_list):
                raise ValueError(
                    f"out_channels has {len(out_list)} entries for {len(in_channels_list)} input levels"
                )
        last = len(in_channels_list) - 1
        self.abfs = nn.ModuleList(
            ABF(c_in, mid_channels, c_out, fuse=i < last, norm=norm)
            for i, (c_in, c_out) in enumerate(zip(in_channels_list, out_list))
        )

    def forward(
        self, features: Sequence[torch.Tensor], out_sizes: Optional[Sequence[Tuple[int, int]]] = None
    ) -> List[torch.Tensor]:
        """``out_sizes``: per level (finest first), the (H, W) to give the output (the teacher's);
        None keeps each level's own size."""
        features = list(features)
        if len(features) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} feature levels (finest first), got {len(features)}")
        if out_sizes is not None and len(out_sizes) != len(features):
            raise ValueError(f"out_sizes has {len(out_sizes)} entries for {len(features)} levels")
        outputs: List[Optional[torch.Tensor]] = [None] * len(features)
        residual = None
        for i in reversed(range(len(features))):  # coarsest first
            size = None if out_sizes is None else out_sizes[i]
            outputs[i], residual = self.abfs[i](features[i], residual, size)
        return outputs  # type: ignore[return-value]


def hcl_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    levels: Sequence[int] = HCL_LEVELS,
) -> torch.Tensor:
    """Hierarchical context loss, summed over feature levels.

    Per level, with ``MSE`` the mean squared error and ``P_l`` adaptive average pooling to l x l:
        loss = (MSE(fs, ft) + sum_k w_k MSE(P_lk(fs), P_lk(ft))) / (1 + sum_k w_k)
    over the pyramid sizes ``l_k`` in ``levels`` that are smaller than the map's height (others
    are skipped, as released), with weights halving: ``w = 1/2, 1/4, 1/8, ...`` in order of use.
    Teacher features are detached. Shapes must match level by level.
    """
    student_features, teacher_features = list(student_features), list(teacher_features)
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"need the same non-zero number of student and teacher levels, got {len(student_features)} "
            f"and {len(teacher_features)}"
        )
    total = student_features[0].new_zeros(())
    for idx, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        if fs.shape != ft.shape or fs.dim() != 4:
            raise ValueError(
                f"level {idx}: student {tuple(fs.shape)} and teacher {tuple(ft.shape)} must both be the "
                "same N x C x H x W"
            )
        ft = ft.detach()
        loss = F.mse_loss(fs, ft)
        weight, weight_sum = 1.0, 1.0
        for size in levels:
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(fs, (size, size))
            pooled_t = F.adaptive_avg_pool2d(ft, (size, size))
            loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
            weight_sum += weight
        total = total + loss / weight_sum
    return total
