"""Name -> constructor registry of the classification models.

CIFAR names are mdistiller's (its teacher folders are ``<name>_vanilla``); ImageNet names carry
an ``imagenet_`` prefix. Every constructor takes ``num_classes`` and returns a module whose
``forward`` gives logits (N, num_classes), whose ``forward_features`` gives the pooled
penultimate features (N, model.feature_dim) and whose ``forward_feature_map`` gives the map
before that global average pooling (N, model.feature_dim, H, W);
``feature_map_and_logits`` gives the map and the logits of one pass.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cifar_mobilenetv2 import mobilenetv2_cifar
from .cifar_resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from .cifar_resnet50 import resnet50_cifar
from .cifar_shufflenet import shufflenet_v1, shufflenet_v2
from .cifar_vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .cifar_wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2
from .imagenet import imagenet_mobilenet_v2, imagenet_resnet18, imagenet_resnet34, imagenet_resnet50
from .mobilenet_v1 import imagenet_mobilenet_v1
from .vit import deit_small, deit_tiny, vit_tiny_test

__all__ = ["CIFAR_MODEL_NAMES", "IMAGENET_MODEL_NAMES", "MODEL_REGISTRY", "SMALL_MODEL_NAMES", "build_model", "list_models",
           "stage_features"]

_CIFAR: Dict[str, Callable[[int], nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobilenetv2_cifar,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
    "ResNet50": resnet50_cifar,
}
_IMAGENET: Dict[str, Callable[[int], nn.Module]] = {
    "imagenet_resnet18": imagenet_resnet18,
    "imagenet_resnet34": imagenet_resnet34,
    "imagenet_resnet50": imagenet_resnet50,
    "imagenet_mobilenet_v2": imagenet_mobilenet_v2,
    "imagenet_mobilenet_v1": imagenet_mobilenet_v1,
    "imagenet_deit_tiny": deit_tiny,
    "imagenet_deit_small": deit_small,
}
# Fixed-size small-input models: the tiny ViT of the tests and the digits demo (16 px images only).
_SMALL: Dict[str, Callable[[int], nn.Module]] = {"vit_tiny16": vit_tiny_test}

CIFAR_MODEL_NAMES = tuple(_CIFAR)
IMAGENET_MODEL_NAMES = tuple(_IMAGENET)
SMALL_MODEL_NAMES = tuple(_SMALL)
MODEL_REGISTRY: Dict[str, Callable[[int], nn.Module]] = {**_CIFAR, **_IMAGENET, **_SMALL}


def list_models() -> List[str]:
    return list(MODEL_REGISTRY)


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; load teacher weights with ``load_teacher_weights``."""
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(MODEL_REGISTRY)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return MODEL_REGISTRY[name](num_classes)


# The classifier layer's attribute in each family (torchvision: fc / classifier; CIFAR: fc,
# classifier or linear); forward is always classifier(global-average-pool(feature map)).
CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "linear")


def stage_features(model: nn.Module, x: torch.Tensor, preact: bool):
    """``(levels, logits)`` of one pass: the stage outputs (finest first) and the pooled feature as
    an (N, C, 1, 1) map, the levels ReviewKD reads; ``preact``: stage outputs before their last ReLU.

    Models with ``forward_stages``: the CIFAR ResNets, the ImageNet ResNets, MobileNet V1 and the
    vision transformer; any other raises a TypeError naming the model.
    """
    if not hasattr(model, "forward_stages"):
        raise TypeError(f"{type(model).__name__} gives no stage features (forward_stages) for ReviewKD")
    return model.forward_stages(x, preact=preact)


def feature_map_and_logits(model: nn.Module, x: torch.Tensor):
    """``(feature map before pooling, logits)`` of one pass; the logits equal ``model(x)``."""
    fmap = model.forward_feature_map(x)
    head = next((getattr(model, a) for a in CLASSIFIER_ATTRIBUTES if isinstance(getattr(model, a, None), nn.Module)),
                None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has none of the classifier attributes {CLASSIFIER_ATTRIBUTES}")
    return fmap, head(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1))
