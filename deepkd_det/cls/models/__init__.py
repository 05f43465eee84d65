"""Classification model zoo: the CIFAR-100 families of the DKD / DeepKD tables and ImageNet models.

``build_model(name, num_classes)`` builds a randomly initialised model; ``load_teacher_weights``
loads a released checkpoint into it strictly (see ``checkpoint.py``). Every model's ``forward``
returns the logits tensor only; ``forward_features`` returns pooled penultimate features,
``forward_feature_map`` the map before pooling (``feature_map_and_logits``: both of one pass).
"""

from .checkpoint import load_teacher_weights, read_state_dict, resolve_teacher_checkpoint
from .registry import (
    CIFAR_MODEL_NAMES,
    IMAGENET_MODEL_NAMES,
    MODEL_REGISTRY,
    build_model,
    feature_map_and_logits,
    list_models,
    stage_features,
)

__all__ = [
    "CIFAR_MODEL_NAMES",
    "IMAGENET_MODEL_NAMES",
    "MODEL_REGISTRY",
    "build_model",
    "feature_map_and_logits",
    "list_models",
    "load_teacher_weights",
    "read_state_dict",
    "resolve_teacher_checkpoint",
    "stage_features",
]
