"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for 32x32 inputs, CRD configurations.

Both use a 1x1 stem to 24 channels with no downsampling, three stages that each start by
halving the map (32 -> 16 -> 8 -> 4), global average pooling and a linear head named ``linear``.

ShuffleV1: groups g = 3, stage widths 240 / 480 / 960 with 4 / 8 / 4 units; a unit is grouped
1x1 conv -> channel shuffle -> 3x3 depthwise -> grouped 1x1 conv, bottleneck width a quarter of
the unit's output. A stride-2 unit concatenates a 3x3 average-pooled shortcut, so its branch
outputs (width - input width) channels. The first grouped conv of the network (on the 24-channel
stem) is not grouped, as in the paper. Names: ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``.

ShuffleV2 (net size 1x): stage widths 116 / 232 / 464 with 3 / 7 / 3 basic units after one
downsampling unit, then a 1x1 conv to 1024. Names: ``layer*.0.{conv1..conv5,bn1..bn5}`` for the
downsampling unit, ``layer*.{i>0}.{conv1..conv3,bn1..bn3}`` for basic units, ``conv2``, ``bn2``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShuffleNetV1", "ShuffleNetV2", "channel_shuffle", "shufflenet_v1", "shufflenet_v2"]

STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> interleave the g groups channel by channel."""
    n, channels, h, w = x.shape
    return x.reshape(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class ShuffleV1Unit(nn.Module):
    def __init__(self, in_channels: int, branch_channels: int, stride: int, groups: int):
        super().__init__()
        mid = branch_channels // 4
        self.first_groups = 1 if in_channels == STEM_CHANNELS else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int = 100,
        stage_widths: Sequence[int] = (240, 480, 960),
        stage_units: Sequence[int] = (4, 8, 4),
        groups: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        channels = STEM_CHANNELS
        for index, (width, units) in enumerate(zip(stage_widths, stage_units), start=1):
            stage = []
            for i in range(units):
                # the stride-2 unit concatenates its input, so its branch adds only the difference
                stage.append(
                    ShuffleV1Unit(channels, width - channels if i == 0 else width, 2 if i == 0 else 1, groups)
                )
                channels = width
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.feature_dim = channels
        self.linear = nn.Linear(channels, num_classes)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


class ShuffleV2BasicUnit(nn.Module):
    """Channel split in halves; one half passes, the other goes 1x1 -> 3x3 dw -> 1x1; shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        passed, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([passed, out], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Both branches see the whole input and halve the map; outputs are concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch: 3x3 dw (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 -> 3x3 dw (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 100,
        stage_widths: Sequence[int] = (116, 232, 464),
        stage_units: Sequence[int] = (3, 7, 3),
        last_channels: int = 1024,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        channels = STEM_CHANNELS
        for index, (width, units) in enumerate(zip(stage_widths, stage_units), start=1):
            stage = [ShuffleV2DownUnit(channels, width)] + [ShuffleV2BasicUnit(width) for _ in range(units)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            channels = width
        self.conv2 = nn.Conv2d(channels, last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.feature_dim = last_channels
        self.linear = nn.Linear(last_channels, num_classes)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


def shufflenet_v1(num_classes: int = 100) -> ShuffleNetV1:
    """CRD "ShuffleV1": groups 3, widths 240/480/960, units 4/8/4."""
    return ShuffleNetV1(num_classes)


def shufflenet_v2(num_classes: int = 100) -> ShuffleNetV2:
    """CRD "ShuffleV2": net size 1x, widths 116/232/464, 3/7/3 basic units, 1024-d last conv."""
    return ShuffleNetV2(num_classes)
