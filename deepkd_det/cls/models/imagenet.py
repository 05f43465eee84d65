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

    def forward_stages(self, x: torch.Tensor, preact: bool = True):
        """``([layer1..layer4 outputs, finest first, then the pooled feature as (N, C, 1, 1)], logits)``.

        With ``preact`` each stage output is taken before its last block's final ReLU (what the
        ReviewKD / GPD releases read, ``is_feat=True``); the logits equal ``forward(x)``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            pre = _block_preact(layer[-1], layer[:-1](x))
            x = torch.relu(pre)
            feats.append(pre if preact else x)
        pooled = self.avgpool(x)
        feats.append(pooled)
        return feats, self.fc(torch.flatten(pooled, 1))


def _block_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock / Bottleneck forward without the final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + identity


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
