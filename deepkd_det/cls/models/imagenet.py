"""ImageNet models: torchvision's ResNet-18/34/50 and MobileNetV2, randomly initialised.

They are torchvision's own classes (subclassed only to add ``forward_features`` and
``feature_dim``), so torchvision's ImageNet weight files load into them unchanged through
``load_teacher_weights``; nothing is downloaded here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "ImageNetMobileNetV2",
    "ImageNetResNet",
    "imagenet_mobilenet_v2",
    "imagenet_resnet18",
    "imagenet_resnet34",
    "imagenet_resnet50",
]


class ImageNetResNet(ResNet):
    def __init__(self, block: type, layers: list, num_classes: int = 1000):
        super().__init__(block, layers, num_classes=num_classes)
        self.feature_dim = self.fc.in_features

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_feature_map(x)), 1)


class ImageNetMobileNetV2(MobileNetV2):
    def __init__(self, num_classes: int = 1000):
        super().__init__(num_classes=num_classes)
        self.feature_dim = self.last_channel

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, shape (N, feature_dim, H, W)."""
        x = self.features(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)


def imagenet_resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def imagenet_resnet34(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def imagenet_resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def imagenet_mobilenet_v2(num_classes: int = 1000) -> ImageNetMobileNetV2:
    return ImageNetMobileNetV2(num_classes)
