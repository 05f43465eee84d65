"""The Table 6 configs, the real architectures (dilated, output stride 8) and ImageNet weights."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch

from deepkd_det.seg.config import ConfigError, load_seg_cfg
from deepkd_det.seg.models import build_seg_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CITYSCAPES = os.path.join(ROOT, "configs", "seg", "cityscapes")
# DiffKD Table 6 (Cityscapes mIoU, val): config -> published number.
TABLE6 = {"teacher_deeplabv3_r101": 78.07, "deeplabv3_r18": 74.21, "diffkd_deeplabv3_r18": 77.78,
          "deeplabv3_r18_scratch": 65.17, "diffkd_deeplabv3_r18_scratch": 74.45, "pspnet_r18": 72.55,
          "diffkd_pspnet_r18": 75.83, "deeplabv3_mv2": 73.12, "diffkd_deeplabv3_mv2": 75.71}


def test_every_shipped_config_loads():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "seg", "*", "*.yaml")))
    assert len(files) >= 20
    for f in files:
        load_seg_cfg(f, ["MODEL.PRETRAINED", ""])


@pytest.mark.parametrize("name", sorted(TABLE6))
def test_table6_configs_follow_the_paper(name):
    path = os.path.join(CITYSCAPES, f"{name}.yaml")
    cfg = load_seg_cfg(path, ["MODEL.PRETRAINED", ""])
    assert re.search(rf"mIoU \(val\): {TABLE6[name]:.2f}", open(path).read())
    assert cfg.DATASET.TYPE == "cityscapes" and list(cfg.INPUT.CROP_SIZE) == [512, 1024]
    assert list(cfg.INPUT.SCALE_RANGE) == [0.5, 2.0] and cfg.INPUT.FLIP
    assert cfg.SOLVER.MOMENTUM == 0.9 and cfg.SOLVER.POLY_POWER == 0.9
    arch = {"r101": ("resnet101", "deeplabv3"), "deeplabv3_r18": ("resnet18", "deeplabv3"),
            "pspnet_r18": ("resnet18", "pspnet"), "mv2": ("mobilenetv2", "deeplabv3")}
    key = next(k for k in arch if k in name)
    assert (cfg.MODEL.BACKBONE, cfg.MODEL.HEAD) == arch[key]
    assert cfg.DISTILLER.TYPE == ("DIFFKD" if name.startswith("diffkd") else "NONE")
    assert (cfg.TEACHER.BACKBONE, cfg.TEACHER.HEAD) == ("resnet101", "deeplabv3")
    scratch = "scratch" in name
    assert bool(load_seg_cfg(path, validate=False).MODEL.PRETRAINED) != scratch


def test_a_missing_imagenet_file_is_one_error():
    with pytest.raises(ConfigError, match="MODEL.PRETRAINED: file not found: pretrained/resnet18-imagenet.pth"):
        load_seg_cfg(os.path.join(CITYSCAPES, "deeplabv3_r18.yaml"))


def _stride_8(model):
    with torch.no_grad():
        assert model.forward_maps(torch.randn(1, 3, 32, 48)).shape == (1, 19, 4, 6)
        assert model(torch.randn(1, 3, 17, 33)).shape == (1, 19, 17, 33)


def test_the_r101_teacher_is_dilated_to_stride_8():
    _stride_8(build_seg_model("resnet101", "deeplabv3", 19).eval())


@pytest.mark.parametrize("backbone,head", [("resnet18", "pspnet"), ("mobilenetv2", "deeplabv3")])
def test_imagenet_weights_from_a_torchvision_file_and_stride_8(tmp_path, backbone, head):
    import torchvision

    net = {"resnet18": torchvision.models.resnet18, "mobilenetv2": torchvision.models.mobilenet_v2}[backbone]()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    model = build_seg_model(backbone, head, 19, pretrained=str(tmp_path / "w.pth"))
    _stride_8(model.eval())
    ours = model.backbone.state_dict()
    theirs = net.state_dict()
    name = "stem.0.weight" if backbone == "resnet18" else "features.0.0.weight"
    src = "conv1.weight" if backbone == "resnet18" else "features.0.0.weight"
    assert torch.equal(ours[name], theirs[src])
    assert torch.equal(ours["layer4.1.conv2.weight" if backbone == "resnet18" else "features.17.conv.2.weight"],
                       theirs["layer4.1.conv2.weight" if backbone == "resnet18" else "features.17.conv.2.weight"])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="MODEL.PRETRAINED does not fit the backbone"):
        build_seg_model(backbone, "deeplabv3", 19, pretrained=str(tmp_path / "bad.pth"))
