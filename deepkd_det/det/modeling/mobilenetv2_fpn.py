"""MobileNetV2 (torchvision's architecture) + FPN, the student of the R-50 -> MV2 detection pair.

The layers are torchvision's own, so torchvision's ImageNet state dict loads into
``backbone.bottom_up`` with the key names unchanged (``features.{i}...``; the last 1x1 conv
``features.18`` and the classifier are not built). Stage outputs, as in the ReviewKD/mdistiller
detection student: ``m2`` (stride 4, 24 channels), ``m3`` (8, 32), ``m4`` (16, 96),
``m5`` (32, 320); FPN adds P6 by max-pooling P5.

Deployment: this file depends on torch, torchvision and detectron2 only (never on the rest of
deepkd_det), so ``tools/export_student.py`` ships a copy of it next to an exported MobileNetV2
student: a plain detectron2 program imports that copy to register the backbones, then builds the
student from the exported ``config.yaml`` (docs/deploy.md). Without ``MODEL.MOBILENETV2`` in the
config (stock detectron2 has no such node) the builders use ``MOBILENETV2_DEFAULTS``;
``add_mobilenetv2_config`` adds the node for configs that set other values.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2 as TVMobileNetV2

__all__ = [
    "MOBILENETV2_DEFAULTS",
    "MobileNetV2Backbone",
    "add_mobilenetv2_config",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "STAGE_ENDS",
]

# MODEL.MOBILENETV2 (deepkd_det/det/config.py documents each key; a test checks they agree).
MOBILENETV2_DEFAULTS = {"OUT_FEATURES": ["m2", "m3", "m4", "m5"], "NORM": "FrozenBN", "WIDTH_MULT": 1.0}

# Index in torchvision's ``features`` of the last block of each output stage.
STAGE_ENDS = {"m2": 3, "m3": 6, "m4": 13, "m5": 17}
# Stage number (detectron2's FREEZE_AT convention) of each ``features`` index: 1 = the stem.
_STAGE_OF_BLOCK = [1] + [2] * 3 + [3] * 3 + [4] * 7 + [5] * 4


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 ``features[0:18]`` as a detectron2 backbone.

    Args:
        out_features: subset of ``("m2", "m3", "m4", "m5")``.
        norm: detectron2 norm name ("FrozenBN", "BN", "SyncBN", "GN", ...).
        freeze_at: 0 trains everything; k >= 1 freezes the stem (1) and the stages m2 .. m_k
            (parameters without gradient, batch norms frozen), like ResNet's FREEZE_AT.
        width_mult: torchvision's width multiplier.
    """

    def __init__(
        self, out_features: List[str], norm: str = "FrozenBN", freeze_at: int = 0, width_mult: float = 1.0
    ):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_ENDS]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.MOBILENETV2.OUT_FEATURES must be a non-empty subset of {list(STAGE_ENDS)}, got {out_features}"
            )
        if not norm:
            raise ValueError("MODEL.MOBILENETV2.NORM must name a norm layer (FrozenBN, BN, SyncBN, GN, ...)")
        tv = TVMobileNetV2(width_mult=width_mult, norm_layer=lambda c: get_norm(norm, c))
        last = max(STAGE_ENDS[f] for f in out_features)
        self.features = nn.Sequential(*list(tv.features.children())[: last + 1])
        self._out_features = list(out_features)
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        stride = 1
        for i, block in enumerate(self.features):
            stride *= _block_stride(block)
            for name, end in STAGE_ENDS.items():
                if end == i:
                    self._out_feature_strides[name] = stride
                    self._out_feature_channels[name] = block.out_channels
        self._end_to_name = {STAGE_ENDS[f]: f for f in self._out_features}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> MobileNetV2Backbone:
        for i, block in enumerate(self.features):
            if _STAGE_OF_BLOCK[i] <= freeze_at:
                for p in block.parameters():
                    p.requires_grad = False
                self.features[i] = FrozenBatchNorm2d.convert_frozen_batchnorm(block)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MobileNetV2 backbone takes N x 3 x H x W images, got {tuple(x.shape)}")
        outputs = {}
        for i, block in enumerate(self.features):
            x = block(x)
            name = self._end_to_name.get(i)
            if name is not None:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _block_stride(block: nn.Module) -> int:
    for m in block.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] > 1:
            return m.stride[0]
    return 1


def add_mobilenetv2_config(cfg) -> None:
    """Add ``MODEL.MOBILENETV2`` (the defaults) to a detectron2 config, unless it is there."""
    if "MOBILENETV2" not in cfg.MODEL:
        cfg.MODEL.MOBILENETV2 = type(cfg)({k: list(v) if isinstance(v, list) else v
                                           for k, v in MOBILENETV2_DEFAULTS.items()})


def _register(builder):
    # Importing this file and a copy of it (the one shipped with an export) registers once.
    if builder.__name__ not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(builder)
    return builder


@_register
def build_mobilenetv2_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV2Backbone:
    if input_shape.channels != 3:
        raise ValueError(
            f"MobileNetV2 needs 3 input channels, got {input_shape.channels} (len(MODEL.PIXEL_MEAN))"
        )
    m = cfg.MODEL.get("MOBILENETV2") or MOBILENETV2_DEFAULTS
    return MobileNetV2Backbone(
        out_features=list(m["OUT_FEATURES"]),
        norm=m["NORM"],
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        width_mult=m["WIDTH_MULT"],
    )


@_register
def build_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 + FPN (P2-P5 from m2-m5, P6 by max pooling), for MODEL.BACKBONE.NAME."""
    bottom_up = build_mobilenetv2_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
