"""ResNet-50 for 32x32 inputs, the "ResNet50" teacher of the CRD / DKD CIFAR tables.

The ImageNet ResNet-50 stage layout (bottleneck blocks [3, 4, 6, 3], widths 64/128/256/512,
expansion 4, stride on the 3x3 conv) with a CIFAR stem: one 3x3 stride-1 convolution and no
max-pool, so the four stages work on 32, 16, 8 and 4 pixel maps.

Parameter names follow the released teacher checkpoint: ``conv1``, ``bn1``,
``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``, ``layer*.0.shortcut.{0,1}`` (projection
conv + BN; identity shortcuts hold no parameters), ``linear``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CifarBottleneckResNet", "resnet50_cifar"]

EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()  # identity; the name is part of the checkpoint layout
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarBottleneckResNet(nn.Module):
    def __init__(self, stage_blocks: Sequence[int] = (3, 4, 6, 3), num_classes: int = 100):
        super().__init__()
        if len(stage_blocks) != 4 or min(stage_blocks) < 1:
            raise ValueError(f"need four stages of >= 1 block, got {list(stage_blocks)}")
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for index, (width, blocks, stride) in enumerate(
            zip((64, 128, 256, 512), stage_blocks, (1, 2, 2, 2)), 1
        ):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(channels, width, stride if i == 0 else 1))
                channels = width * EXPANSION
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.feature_dim = channels
        self.linear = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


def resnet50_cifar(num_classes: int = 100) -> CifarBottleneckResNet:
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)
