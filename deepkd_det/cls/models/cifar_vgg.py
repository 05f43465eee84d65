"""VGG with batch-norm for 32x32 inputs, the small-resolution variant of the CRD benchmark.

Five blocks of 3x3 conv (with bias) + BN + ReLU, configured per depth below. Between blocks
0-1, 1-2 and 2-3 a 2x2 max-pool halves the map (32 -> 16 -> 8 -> 4); at 32x32 the fourth
max-pool is skipped, so blocks 3 and 4 both work on 4x4 maps (it is applied on larger inputs,
e.g. 64x64). Global average pooling then gives a 512-d vector for a single linear classifier.

Parameter names follow the released teacher checkpoints: ``block{0..4}.{j}`` where each block
is a Sequential ``conv, bn, relu, conv, bn, ...`` whose *last* ReLU is left out (it is applied
in ``forward``), so conv layers sit at indices 0, 3, 6, ... and BN at 1, 4, 7, ...; the head is
``classifier``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CifarVGG", "VGG_STAGE_WIDTHS", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]

# conv widths of the five blocks; the names count conv layers plus the three FC layers of the
# ImageNet VGG (here one linear layer replaces them); vgg8 is the CRD student, one conv per block
VGG_STAGE_WIDTHS: Dict[str, List[List[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _conv_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])  # last ReLU is applied in forward (keeps checkpoint indices)


class CifarVGG(nn.Module):
    def __init__(self, stage_widths: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        if len(stage_widths) != 5 or any(len(w) == 0 for w in stage_widths):
            raise ValueError(f"VGG needs five non-empty blocks of widths, got {stage_widths}")
        in_channels = 3
        for index, widths in enumerate(stage_widths):
            self.add_module(f"block{index}", _conv_block(in_channels, widths))
            in_channels = widths[-1]
        self.feature_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = F.relu(self.block0(x))
        x = F.relu(self.block1(F.max_pool2d(x, 2)))
        x = F.relu(self.block2(F.max_pool2d(x, 2)))
        x = F.relu(self.block3(F.max_pool2d(x, 2)))
        if x.shape[-1] > 4:  # 32x32 inputs keep the 4x4 map for the last block
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def vgg8(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(VGG_STAGE_WIDTHS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(VGG_STAGE_WIDTHS["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(VGG_STAGE_WIDTHS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(VGG_STAGE_WIDTHS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(VGG_STAGE_WIDTHS["vgg19"], num_classes)
