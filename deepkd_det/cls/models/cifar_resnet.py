"""ResNets for 32x32 inputs (He et al. 2016, section 4.2) as used by the KD literature.

Three stages of ``n`` basic blocks on 32x32, 16x16 and 8x8 maps, depth ``6n + 2``. As in the
CRD / mdistiller teachers, a shortcut that changes shape is a 1x1 convolution + BN (the paper's
option B) rather than zero padding, and the ``x4`` variants are 4x wider at the stem and in
every stage: channels [32, 64, 128, 256] instead of [16, 16, 32, 64].

Parameter names follow the released teacher checkpoints: ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``layer*.0.downsample.{0,1}``, ``fc``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CifarResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]

NARROW_CHANNELS = (16, 16, 32, 64)
WIDE_CHANNELS = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs; ReLU after the residual sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward_preact(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum before the final ReLU (``forward(x) == relu(forward_preact(x))``)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.forward_preact(x))


class CifarResNet(nn.Module):
    """Depth ``6n + 2`` ResNet; ``channels`` = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, channels: Sequence[int], num_classes: int = 100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if len(channels) != 4:
            raise ValueError(f"channels must list (stem, stage1, stage2, stage3), got {list(channels)}")
        blocks_per_stage = (depth - 2) // 6
        stem, *stage_channels = channels
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_channels = stem
        for index, (width, stride) in enumerate(zip(stage_channels, (1, 2, 2)), start=1):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, width, stride if b == 0 else 1))
                in_channels = width
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.feature_dim = in_channels
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled output of the last stage, shape (N, feature_dim)."""
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor, preact: bool = False):
        """``([stage 1..3 outputs, finest first, then the pooled feature as (N, C, 1, 1)], logits)``.

        Stage outputs before the last block's ReLU with ``preact`` (mdistiller's ``preact_feats``),
        after it otherwise (``feats``); the logits equal ``forward(x)``.
        """
        x = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3):
            pre = layer[-1].forward_preact(layer[:-1](x))
            x = F.relu(pre)
            feats.append(pre if preact else x)
        pooled = F.adaptive_avg_pool2d(x, 1)
        feats.append(pooled)
        return feats, self.fc(torch.flatten(pooled, 1))


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, NARROW_CHANNELS, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, NARROW_CHANNELS, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, NARROW_CHANNELS, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, NARROW_CHANNELS, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, NARROW_CHANNELS, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, NARROW_CHANNELS, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, NARROW_CHANNELS, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, WIDE_CHANNELS, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, WIDE_CHANNELS, num_classes)
