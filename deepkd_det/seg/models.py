"""Segmentation models of DiffKD's Table 6: DeepLabV3 (ASPP) and PSPNet heads on dilated backbones.

Backbones (output stride 8, the dilated form the papers use): torchvision's ResNet-18 /
ResNet-101 / MobileNetV2 with the strides of their last stages replaced by dilation (ResNet:
layer3 dilation 2, layer4 dilation 4; MobileNetV2: blocks 7-13 dilation 2, 14-17 dilation 4), and
``tiny``, a small three-stage conv net (also output stride 8) for the tests and the CPU demo.
ImageNet weights come from a torchvision state-dict file (``MODEL.PRETRAINED``; no download).

``SegModel.forward_maps(x)`` gives the class maps at 1/8 of the input (the "predicted
segmentation maps" DiffKD works on); ``forward(x)`` upsamples them bilinearly to the input size.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BACKBONES", "HEADS", "ASPPHead", "PSPHead", "SegModel", "build_seg_model", "dilate_"]

BACKBONES = ("resnet18", "resnet101", "mobilenetv2", "tiny")
HEADS = ("deeplabv3", "pspnet")


def _conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def dilate_(module: nn.Module, dilation: int) -> None:
    """Turn every strided or 3x3 conv of ``module`` into stride 1 with ``dilation`` (padding kept
    'same'): the output-stride-8 form of a backbone stage. 1x1 convs (shortcuts) lose their stride."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride != (1, 1):
                m.stride = (1, 1)
            if m.kernel_size[0] > 1:
                m.dilation = (dilation, dilation)
                m.padding = (dilation * (m.kernel_size[0] // 2),) * 2


class _ResNetBackbone(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        import torchvision

        net = {18: torchvision.models.resnet18, 101: torchvision.models.resnet101}[depth](weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        dilate_(self.layer3, 2)
        dilate_(self.layer4, 4)
        self.out_channels = 512 if depth == 18 else 2048

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def load_pretrained(self, state: Dict[str, torch.Tensor]) -> None:
        mapped = {}
        for k, v in state.items():
            if k.startswith("fc."):
                continue
            for src, dst in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
                if k.startswith(src):
                    k = dst + k[len(src):]
            mapped[k] = v
        _load_exact(self, mapped)


class _MobileNetV2Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        import torchvision

        self.features = torchvision.models.mobilenet_v2(weights=None).features[:-1]  # up to block 17 (320 ch)
        for i in range(7, 14):
            dilate_(self.features[i], 2)
        for i in range(14, 18):
            dilate_(self.features[i], 4)
        self.out_channels = 320

    def forward(self, x):
        return self.features(x)

    def load_pretrained(self, state: Dict[str, torch.Tensor]) -> None:
        keep = {k: v for k, v in state.items() if k.startswith("features.") and not k.startswith("features.18.")}
        _load_exact(self, keep)


class _TinyBackbone(nn.Module):
    """Three stages of two 3x3 convs (stride 2 after each: output stride 8) and a dilated 3x3,
    ``width`` channels in the first stage."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            _conv_bn_relu(3, w), _conv_bn_relu(w, w), nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w), _conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w), _conv_bn_relu(4 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn_relu(4 * w, 4 * w, dilation=2),
        )
        self.out_channels = 4 * w

    def forward(self, x):
        return self.body(x)

    def load_pretrained(self, state):
        _load_exact(self, state)


def _load_exact(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"MODEL.PRETRAINED does not fit the backbone: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shape {wrong[:4]} (expected a torchvision ImageNet state dict)")
    module.load_state_dict(state)


class ASPPHead(nn.Module):
    """DeepLabV3's head: ASPP (1x1, three dilated 3x3 at ``rates``, image pooling) -> 1x1 project
    -> 3x3 conv -> 1x1 classifier (torchvision's DeepLabHead layout, width ``channels``)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1)]
                                      + [_conv_bn_relu(in_channels, channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(rates) + 2), channels, 1), nn.Dropout(0.1))
        self.fuse = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.classifier(self.fuse(self.project(torch.cat(outs, dim=1))))


class PSPHead(nn.Module):
    """PSPNet's pyramid pooling module (bins 1, 2, 3, 6; each 1x1 to in/4 channels, upsampled and
    concatenated with the input) -> 3x3 conv ``channels`` -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        reduced = max(1, in_channels // len(bins))
        self.stages = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(b), _conv_bn_relu(in_channels, reduced, 1))
                                     for b in bins])
        self.fuse = nn.Sequential(_conv_bn_relu(in_channels + reduced * len(bins), channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.classifier(self.fuse(torch.cat([x] + pooled, dim=1)))


class SegModel(nn.Module):
    """Backbone + head; ``forward_maps``: class maps at 1/8, ``forward``: upsampled to the input size."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.head, self.num_classes = backbone, head, int(num_classes)

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(self.forward_maps(x), x.shape[-2:])


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of class maps to ``size`` (H, W) (align_corners False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def build_seg_model(backbone: str, head: str, num_classes: int, *, width: int = 16, head_channels: int = 0,
                    aspp_rates: Sequence[int] = (12, 24, 36), pretrained: str = "") -> SegModel:
    """A ``SegModel``; ``head_channels`` 0: the papers' widths (ASPP 256, PSP 512); ``pretrained``:
    a torchvision ImageNet state-dict file for the backbone (weights-only read)."""
    if backbone not in BACKBONES:
        raise ValueError(f"MODEL.BACKBONE must be one of {BACKBONES}, got {backbone!r}")
    if head not in HEADS:
        raise ValueError(f"MODEL.HEAD must be one of {HEADS}, got {head!r}")
    if backbone == "tiny":
        body = _TinyBackbone(width)
    elif backbone == "mobilenetv2":
        body = _MobileNetV2Backbone()
    else:
        body = _ResNetBackbone(int(backbone[len("resnet"):]))
    if pretrained:
        from deepkd_det.core.io import load_weights_only

        state = load_weights_only(pretrained)
        body.load_pretrained(state.get("model", state) if isinstance(state, dict) else state)
    if head == "deeplabv3":
        h = ASPPHead(body.out_channels, num_classes, head_channels or 256, aspp_rates)
    else:
        h = PSPHead(body.out_channels, num_classes, head_channels or 512)
    return SegModel(body, h, num_classes)
