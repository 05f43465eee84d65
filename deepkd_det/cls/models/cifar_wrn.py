"""Wide residual networks WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis 2016), dropout 0.

Pre-activation blocks (BN-ReLU-conv), three groups of ``n = (d - 4) / 6`` blocks with widths
16k, 32k, 64k, then BN-ReLU, global average pooling and a linear classifier. As in the original
implementation (and the CRD / mdistiller teachers), when a block changes width its shortcut is
a 1x1 convolution applied to the *pre-activated* input.

Parameter names follow the released teacher checkpoints: ``conv1``,
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.same_width = in_channels == out_channels
        # checkpoint name kept from the original WRN code
        self.convShortcut = None
        if not self.same_width:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.same_width else self.convShortcut(activated)
        return shortcut + out


class BlockGroup(nn.Module):
    """One group of blocks; the ``layer`` attribute is part of the checkpoint names."""

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                PreActBlock(
                    in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, drop_rate
                )
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = BlockGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = BlockGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = BlockGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
