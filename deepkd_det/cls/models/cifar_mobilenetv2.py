"""MobileNetV2 (Sandler et al. 2018) as the "MobileNetV2" student of the CRD / DKD CIFAR tables.

Width multiplier 0.5 and expansion ratio t = 6 (the first stage keeps t = 1), the standard
inverted-residual stage table, a stride-2 stem (32x32 -> 16x16) and a 1280-channel last 1x1
convolution (the multiplier does not shrink it below 1280). Unlike torchvision's ImageNet model,
every block keeps its expanding 1x1 conv, also when t = 1; the released checkpoints have it.

Parameter names follow those checkpoints: ``conv1.{0,1}`` (conv, BN), ``blocks.{stage}.{i}.conv.{0..7}``
(expand conv, BN, ReLU, depthwise conv, BN, ReLU, project conv, BN), ``conv2.{0,1}``,
``classifier.0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CifarMobileNetV2", "INVERTED_RESIDUAL_STAGES", "mobilenetv2_cifar"]

# (expansion t, output channels c, blocks n, first stride s), from the MobileNetV2 paper's Table 2
INVERTED_RESIDUAL_STAGES = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),  # None: the model's expansion ratio
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),  # linear bottleneck: no ReLU after
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expansion: int = 6):
        super().__init__()
        if width_mult <= 0 or expansion < 1:
            raise ValueError(f"need width_mult > 0 and expansion >= 1, got {width_mult}, {expansion}")
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in INVERTED_RESIDUAL_STAGES:
            out_channels = int(c * width_mult)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t or expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channels, 1, 1)
        self.feature_dim = last_channels
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def mobilenetv2_cifar(num_classes: int = 100) -> CifarMobileNetV2:
    """The CRD / DKD "MobileNetV2": width 0.5, t = 6."""
    return CifarMobileNetV2(num_classes, width_mult=0.5, expansion=6)
