"""MobileNet (V1) for ImageNet, the student of the GPD release's ResNet-50 -> MobileNet pair.

The layout is the GPD release's ``CNN/models/mobilenet.py`` (itself the common PyTorch MobileNet
of the KD literature, e.g. the ReviewKD / OFD ImageNet code): ``model`` is a Sequential of 14
blocks and a pooling layer, ``model.0`` = conv 3x3 stride 2 + BN + ReLU (32 channels), then 13
depthwise-separable blocks ``model.1..13`` (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU),
``fc`` the classifier; 4.23 M parameters at 1000 classes. The release pools with a fixed
``AvgPool2d(7)`` (224 px input); here ``model.14`` is global average pooling, which is the same on
224 px input, holds no tensors (the state dict is unchanged) and also works on small test images.
A checkpoint in that layout (``{"state_dict": ...}`` with ``module.`` keys, as the release's
``mobilenet_sgd_68.848.pth.tar``) loads through ``load_teacher_weights``; torchvision publishes no
MobileNet V1 weights.

``forward_stages`` gives what the release's ReviewKD reads (``extract_feature(preReLU=True)``):
the pre-ReLU outputs of ``model.3``, ``model.5``, ``model.11`` and ``model.13`` (128, 256, 512,
1024 channels at strides 4, 8, 16, 32) and the pooled feature as a 1 x 1 map.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MOBILENET_V1_STAGES", "MobileNetV1", "imagenet_mobilenet_v1"]

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
           (512, 1), (1024, 2), (1024, 1))
# The blocks whose (pre-ReLU) output ReviewKD reads.
MOBILENET_V1_STAGES = (3, 5, 11, 13)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNet V1 (Howard et al. 2017); ``width_mult`` scales every channel count (1.0: the release)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()

        def c(channels: int) -> int:
            return max(8, int(round(channels * width_mult)))

        layers = [_conv_bn(3, c(32), 2)]
        inp = c(32)
        for oup, stride in _BLOCKS:
            layers.append(_conv_dw(inp, c(oup), stride))
            inp = c(oup)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.feature_dim = inp
        self.stage_channels = tuple(self.model[i][-3].out_channels for i in MOBILENET_V1_STAGES)
        self.fc = nn.Linear(inp, num_classes)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        return self.model[:14](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model[14](self.forward_feature_map(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor, preact: bool = True) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """``([stage maps, finest first, then the pooled feature as (N, C, 1, 1)], logits)`` of one pass.

        Stage maps are the outputs of ``model.3 / 5 / 11 / 13`` before their last ReLU (``preact``)
        or after it. The logits equal ``forward(x)``.
        """
        feats = []
        start = 0
        for end in MOBILENET_V1_STAGES:
            x = self.model[start:end](x)
            block = self.model[end]
            pre = block[:-1](x)
            x = F.relu(pre)
            feats.append(pre if preact else x)
            start = end + 1
        pooled = self.model[14](x)
        feats.append(pooled)
        return feats, self.fc(torch.flatten(pooled, 1))


def imagenet_mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)
