"""Classification model zoo: registry, shapes, published sizes, checkpoint layout and strict loading."""

from __future__ import annotations

import argparse
import functools
import os

import pytest
import torch
import torch.nn as nn
import torchvision

from deepkd_det.cls.models import (
    CIFAR_MODEL_NAMES,
    IMAGENET_MODEL_NAMES,
    MODEL_REGISTRY,
    build_model,
    list_models,
    load_teacher_weights,
    resolve_teacher_checkpoint,
)

CIFAR_NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
    "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
]  # fmt: skip
IMAGENET_NAMES = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v2",
                  "imagenet_mobilenet_v1", "imagenet_deit_tiny", "imagenet_deit_small"]
SMALL_NAMES = ["vit_tiny16"]



@functools.cache
def _cifar100(name: str) -> nn.Module:
    """One 100-class instance per name, shared by the read-only tests (building is the slow part)."""
    torch.manual_seed(0)
    return build_model(name, 100).eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BN statistics, so eval-mode logits depend on every stored tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)
            elif value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=g) * 0.1)
    return model.eval()


def _save_teacher(root, name: str, payload) -> str:
    folder = os.path.join(root, f"{name}_vanilla")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ckpt_epoch_240.pth")
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------- registry


def test_registry_holds_exactly_the_contract_names():
    assert list_models() == CIFAR_NAMES + IMAGENET_NAMES + SMALL_NAMES
    assert list(MODEL_REGISTRY) == list_models()
    assert list(CIFAR_MODEL_NAMES) == CIFAR_NAMES and list(IMAGENET_MODEL_NAMES) == IMAGENET_NAMES


def test_unknown_name_and_bad_class_count_are_refused():
    with pytest.raises(KeyError) as info:
        build_model("resnet9000", 100)
    message = str(info.value)
    assert "resnet9000" in message and "resnet32x4" in message and "imagenet_resnet50" in message
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            build_model("resnet8", bad)


# ---------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_models_give_logits_and_features(name):
    model = _cifar100(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 100)
    assert features.shape == (2, model.feature_dim)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_models_give_logits_and_features(name):
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, getattr(model, "img_size", 64), getattr(model, "img_size", 64))
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    assert features.shape == (2, model.feature_dim)


# published sizes in millions of parameters: CIFAR-100 models from the CRD benchmark tables,
# ImageNet models from torchvision's model documentation (1000 classes)
PUBLISHED_MILLIONS = {
    "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.73, "resnet8x4": 1.23,
    "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.25, "vgg8": 3.96,
    "vgg13": 9.46, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.35, "ResNet50": 23.71,
}  # fmt: skip
IMAGENET_PUBLISHED_MILLIONS = {
    "imagenet_resnet18": 11.69, "imagenet_resnet34": 21.80, "imagenet_resnet50": 25.56,
    "imagenet_mobilenet_v2": 3.50,
    "imagenet_mobilenet_v1": 4.23,  # the GPD / ReviewKD MobileNet (4,231,976 parameters)
    "imagenet_deit_tiny": 5.72, "imagenet_deit_small": 22.05,  # DeiT paper / timm
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_cifar_parameter_counts_match_published(name):
    millions = _n_params(_cifar100(name)) / 1e6
    assert millions == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.03)


@pytest.mark.parametrize("name", sorted(IMAGENET_PUBLISHED_MILLIONS))
def test_imagenet_parameter_counts_match_published(name):
    millions = _n_params(build_model(name, 1000)) / 1e6
    assert millions == pytest.approx(IMAGENET_PUBLISHED_MILLIONS[name], rel=0.03)


# ---------------------------------------------------------------- checkpoint layout

# (key, shape) facts of the released CIFAR teacher / student checkpoints, derived from the
# architectures: e.g. ShuffleV1's first unit has a 216-channel branch (240 - 24 concatenated)
# with a 54-channel bottleneck and groups 3 in its last 1x1 conv.
LAYOUT_FACTS = {
    "resnet56": {"conv1.weight": (16, 3, 3, 3), "layer1.8.bn2.running_mean": (16,),
                 "layer2.0.downsample.0.weight": (32, 16, 1, 1), "fc.weight": (100, 64)},
    "resnet8x4": {"layer1.0.downsample.0.weight": (64, 32, 1, 1), "layer3.0.downsample.1.weight": (256,),
                  "fc.weight": (100, 256)},
    "wrn_40_2": {"block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.conv2.weight": (128, 128, 3, 3),
                 "block2.layer.0.bn1.weight": (32,), "bn1.running_var": (128,), "fc.weight": (100, 128)},
    "vgg13": {"block0.0.bias": (64,), "block1.3.weight": (128, 128, 3, 3), "block1.4.running_var": (128,),
              "block4.4.weight": (512,), "classifier.weight": (100, 512)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.1.0.conv.3.weight": (48, 1, 3, 3), "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
                    "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.weight": (100, 1280)},
    "ShuffleV1": {"layer1.0.conv1.weight": (54, 24, 1, 1), "layer1.0.conv3.weight": (216, 18, 1, 1),
                  "layer2.0.conv1.weight": (60, 80, 1, 1), "layer3.3.bn3.weight": (960,), "linear.weight": (100, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.0.conv5.weight": (58, 58, 1, 1),
                  "layer2.7.conv2.weight": (116, 1, 3, 3), "conv2.weight": (1024, 464, 1, 1),
                  "linear.weight": (100, 1024)},
    "ResNet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "linear.weight": (100, 2048)},
}  # fmt: skip
ABSENT_KEYS = {
    "resnet56": ["layer1.0.downsample.0.weight"],  # same width: identity shortcut
    "wrn_16_1": ["block1.layer.0.convShortcut.weight"],
    "vgg13": ["block1.5.weight", "pool4.weight"],  # last ReLU of a block is not stored
    "ResNet50": ["layer1.1.shortcut.0.weight"],
}


@pytest.mark.parametrize("name", sorted(LAYOUT_FACTS))
def test_state_dict_layout_matches_released_checkpoints(name):
    state = _cifar100(name).state_dict()
    for key, shape in LAYOUT_FACTS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in state, key


def test_imagenet_layout_is_torchvision():
    mine = build_model("imagenet_resnet18", 1000).state_dict()
    reference = torchvision.models.resnet18(weights=None).state_dict()
    assert list(mine) == list(reference)
    assert all(mine[k].shape == reference[k].shape for k in reference)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_mdistiller_teacher_checkpoint_reproduces_logits(tmp_path, name):
    teacher = _randomise(build_model(name, 100), seed=1)
    _save_teacher(
        tmp_path, name, {"model": teacher.state_dict(), "epoch": 240, "accuracy": torch.tensor(75.0)}
    )
    fresh = _randomise(build_model(name, 100), seed=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = teacher(x)
        assert not torch.allclose(fresh(x), expected)

        load_teacher_weights(fresh, resolve_teacher_checkpoint(tmp_path, name))
        assert torch.equal(fresh(x), expected)

        # the cifar_teachers directory plus the model name works the same way
        other = _randomise(build_model(name, 100), seed=3)
        assert load_teacher_weights(other, tmp_path, model_name=name) is other
        assert torch.equal(other(x), expected)


@pytest.mark.parametrize("wrap", ["state_dict_key", "plain", "dataparallel", "no_bn_counters"])
def test_other_checkpoint_wrappings_load(tmp_path, wrap):
    teacher = _randomise(build_model("resnet8", 100), seed=4)
    state = teacher.state_dict()
    payload = {
        "state_dict_key": {"state_dict": state},
        "plain": state,
        "dataparallel": {"model": {f"module.{k}": v for k, v in state.items()}},
        "no_bn_counters": {
            "model": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        },
    }[wrap]
    path = tmp_path / "teacher.pth"
    torch.save(payload, path)
    student = _randomise(build_model("resnet8", 100), seed=5)
    load_teacher_weights(student, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def test_torchvision_weight_file_loads(tmp_path):
    torch.manual_seed(6)
    reference = _randomise(torchvision.models.resnet18(weights=None), seed=6)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")  # torchvision files are plain state dicts
    model = load_teacher_weights(build_model("imagenet_resnet18", 1000), tmp_path / "resnet18.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_dropped_and_renamed_keys_are_refused_and_listed(tmp_path):
    state = _randomise(build_model("resnet8", 100), seed=7).state_dict()
    del state["layer1.0.bn1.weight"]
    state["fc.b"] = state.pop("fc.bias")
    path = _save_teacher(tmp_path, "resnet8", {"model": state})
    model = build_model("resnet8", 100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_teacher_weights(model, path)
    message = str(info.value)
    assert "missing keys (2)" in message and "layer1.0.bn1.weight" in message and "fc.bias" in message
    assert "unexpected keys (1)" in message and "fc.b" in message
    # nothing was half-loaded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_class_count_mismatch_is_refused_with_shapes(tmp_path):
    path = _save_teacher(tmp_path, "resnet8", {"model": build_model("resnet8", 100).state_dict()})
    with pytest.raises(ValueError) as info:
        load_teacher_weights(build_model("resnet8", 10), path)
    message = str(info.value)
    assert "fc.weight: checkpoint (100, 64) vs model (10, 64)" in message and "fc.bias" in message


def test_missing_teacher_and_bad_files_get_clear_errors(tmp_path):
    expected = os.path.join(str(tmp_path), "resnet56_vanilla", "ckpt_epoch_240.pth")
    with pytest.raises(FileNotFoundError) as info:
        resolve_teacher_checkpoint(tmp_path, "resnet56")
    assert expected in str(info.value)
    with pytest.raises(FileNotFoundError, match="resnet56_vanilla"):
        load_teacher_weights(build_model("resnet56", 100), tmp_path, model_name="resnet56")
    with pytest.raises(ValueError, match="model_name"):
        load_teacher_weights(build_model("resnet8", 100), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_teacher_weights(build_model("resnet8", 100), tmp_path / "nope.pth")

    # an arbitrary pickled object is refused by the weights-only loader
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_teacher_weights(build_model("resnet8", 100), tmp_path / "pickled.pth")
    torch.save({"model": {"conv1.weight": [1.0, 2.0]}}, tmp_path / "lists.pth")
    with pytest.raises(ValueError, match="not tensors"):
        load_teacher_weights(build_model("resnet8", 100), tmp_path / "lists.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_teacher_weights(build_model("resnet8", 100), tmp_path / "garbage.pth")
