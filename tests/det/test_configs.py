"""The detection YAML: each setting written once, and every config resolving to the student and
teacher it resolved to before the YAML was shortened (values captured from that resolution)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402

from deepkd_det.det.config import (  # noqa: E402
    add_deepkd_config,
    get_deepkd_cfg,
    merge_config_file,
    resolve_teacher_cfg,
)
from deepkd_det.det.data import add_data_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "DEEPKD"

MSRA = {"PIXEL_MEAN": [103.53, 116.28, 123.675], "PIXEL_STD": [1.0, 1.0, 1.0], "RESNETS.STRIDE_IN_1X1": True}
TORCHVISION = {"PIXEL_MEAN": [123.675, 116.28, 103.53], "PIXEL_STD": [58.395, 57.12, 57.375]}
COCO = {"BACKBONE.NAME": "build_resnet_fpn_backbone", "FPN.OUT_CHANNELS": 256, "ROI_HEADS.NUM_CLASSES": 80,
        "ROI_BOX_HEAD.FC_DIM": 1024, "ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
        "FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"], "RESNETS.NORM": "FrozenBN"}
DEMO = {"BACKBONE.NAME": "build_resnet_fpn_backbone", "FPN.OUT_CHANNELS": 64, "ROI_HEADS.NUM_CLASSES": 3,
        "ROI_BOX_HEAD.FC_DIM": 128, "ANCHOR_GENERATOR.SIZES": [[8], [16], [32], [64], [128]],
        "FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"], "RESNETS.NORM": "BN", "RESNETS.DEPTH": 18,
        "RESNETS.RES2_OUT_CHANNELS": 64, **MSRA}

DEMO_RETINANET = {**DEMO, "ANCHOR_GENERATOR.SIZES": [[8], [16], [32], [64]],
                  "RETINANET.IN_FEATURES": ["p2", "p3", "p4", "p5"], "RETINANET.NUM_CLASSES": 3}

# configs/DEEPKD/custom: Faster R-CNN FPN with GroupNorm from scratch, class count from the json (0).
CUSTOM = {"BACKBONE.NAME": "build_resnet_fpn_backbone", "BACKBONE.FREEZE_AT": 0, "FPN.OUT_CHANNELS": 256,
          "FPN.NORM": "GN", "ROI_HEADS.NUM_CLASSES": 0, "ROI_BOX_HEAD.FC_DIM": 1024,
          "ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]], "RESNETS.NORM": "GN",
          "RESNETS.STRIDE_IN_1X1": False, "PIXEL_MEAN": [103.53, 116.28, 123.675], "PIXEL_STD": [1.0, 1.0, 1.0]}
CUSTOM_R50 = {**CUSTOM, "META_ARCHITECTURE": "GeneralizedRCNN", "RESNETS.DEPTH": 50, "RESNETS.RES2_OUT_CHANNELS": 256}


def _teacher(depth):
    """A detectron2 model-zoo Faster R-CNN FPN teacher (weights from the teacher.* keys)."""
    return {**COCO, **MSRA, "META_ARCHITECTURE": "GeneralizedRCNN", "RESNETS.DEPTH": depth,
            "RESNETS.RES2_OUT_CHANNELS": 256, "WEIGHTS": ""}


# (INPUT.FORMAT, student MODEL, teacher MODEL or None); TEACHER.INPUT_FORMAT is BGR everywhere.
EXPECTED = {
    "R18-R101": ("RGB", {**COCO, **TORCHVISION, "META_ARCHITECTURE": "DeepKDRCNN", "RESNETS.DEPTH": 18,
                         "RESNETS.STRIDE_IN_1X1": True, "RESNETS.RES2_OUT_CHANNELS": 64,
                         "WEIGHTS": "pretrained/r18-r101.pth"}, _teacher(101)),
    # Changed on purpose (issue 10): the R-50 pair follows the ReviewKD release, detectron2's MSRA
    # R-50 (it had torchvision's RGB / normalisation / STRIDE_IN_1X1 False before).
    "R50-R101": ("BGR", {**COCO, **MSRA, "META_ARCHITECTURE": "DeepKDRCNN", "RESNETS.DEPTH": 50,
                         "RESNETS.RES2_OUT_CHANNELS": 256, "WEIGHTS": "pretrained/r50-r101.pth"}, _teacher(101)),
    "MV2-R50": ("RGB", {**COCO, **TORCHVISION, "META_ARCHITECTURE": "DeepKDRCNN",
                        "BACKBONE.NAME": "build_mobilenetv2_fpn_backbone", "FPN.IN_FEATURES": ["m2", "m3", "m4", "m5"],
                        "WEIGHTS": "pretrained/mv2-r50.pth"}, _teacher(50)),
    "base": ("BGR", {**COCO, **MSRA, "META_ARCHITECTURE": "DeepKDRCNN", "RESNETS.DEPTH": 50,
                     "RESNETS.RES2_OUT_CHANNELS": 256, "WEIGHTS": ""}, _teacher(101)),
    "demo-kd": ("BGR", {**DEMO, "META_ARCHITECTURE": "DeepKDRCNN", "WEIGHTS": ""},
                {**DEMO, "META_ARCHITECTURE": "GeneralizedRCNN", "WEIGHTS": "output/demo/teacher/model_final.pth"}),
    "demo-plain": ("BGR", {**DEMO, "META_ARCHITECTURE": "GeneralizedRCNN", "WEIGHTS": ""}, None),
    # The demo's other families (tools/det_demo.py --methods mask retinanet): the same backbone and FPN.
    "demo-mask-kd": ("BGR", {**DEMO, "META_ARCHITECTURE": "DeepKDRCNN", "MASK_ON": True, "WEIGHTS": ""},
                     {**DEMO, "META_ARCHITECTURE": "GeneralizedRCNN", "MASK_ON": True,
                      "WEIGHTS": "output/demo/teacher-mask/model_final.pth"}),
    "demo-mask-plain": ("BGR", {**DEMO, "META_ARCHITECTURE": "GeneralizedRCNN", "MASK_ON": True, "WEIGHTS": ""}, None),
    "demo-retinanet-kd": ("BGR", {**DEMO_RETINANET, "META_ARCHITECTURE": "DistillDetector", "WEIGHTS": ""},
                          {**DEMO_RETINANET, "META_ARCHITECTURE": "RetinaNet",
                           "WEIGHTS": "output/demo/teacher-retinanet/model_final.pth"}),
    "demo-retinanet-plain": ("BGR", {**DEMO_RETINANET, "META_ARCHITECTURE": "RetinaNet", "WEIGHTS": ""}, None),
    # Base-Custom.yaml holds the data, the class count and the schedule, no architecture.
    "custom-base": ("BGR", {"META_ARCHITECTURE": "GeneralizedRCNN", "ROI_HEADS.NUM_CLASSES": 0, "WEIGHTS": ""}, None),
    "custom-teacher": ("BGR", {**CUSTOM_R50, "WEIGHTS": ""}, None),
    # The teacher is exactly the model teacher-R50.yaml trains (its TEACHER.CONFIG_FILE).
    "custom-student": ("BGR", {**CUSTOM, "META_ARCHITECTURE": "DeepKDRCNN", "RESNETS.DEPTH": 18,
                               "RESNETS.RES2_OUT_CHANNELS": 64, "WEIGHTS": ""},
                       {**CUSTOM_R50, "WEIGHTS": "output/custom/teacher/model_final.pth"}),
}


def _group(path):
    name = os.path.basename(path)
    path = os.path.relpath(path, CONFIGS)  # the folder inside configs/DEEPKD, not the checkout's
    if "custom" in path:
        return {"Base-Custom.yaml": "custom-base", "teacher-R50.yaml": "custom-teacher"}.get(name, "custom-student")
    for pair in ("R18-R101", "R50-R101", "MV2-R50"):
        if pair in name:
            return pair
    if "demo" in path:
        family = next((f"-{f}" for f in ("mask", "retinanet") if f in name), "")
        return f"demo{family}-kd" if name.startswith("student-") and "vanilla" not in name else f"demo{family}-plain"
    return "base"


def _get(node, dotted):
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


PATHS = sorted(glob.glob(str(CONFIGS / "**" / "*.yaml"), recursive=True))

# ---------------------------------------------------------------- Mask R-CNN, RetinaNet, DiffKD rows
# The values that define each row of issue 21 (ReviewKD release configs, DiffKD Tables 4 and 5):
# dotted keys of the merged config ("T." for the resolved teacher's MODEL).
RETINA_SIZES = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]]
MASK_SCHEDULE = {"SOLVER.IMS_PER_BATCH": 8, "SOLVER.BASE_LR": 0.01, "SOLVER.MAX_ITER": 180000,
                 "SOLVER.STEPS": [120000, 160000], "MODEL.MASK_ON": True, "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
                 "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14, "MODEL.META_ARCHITECTURE": "DeepKDRCNN",
                 "T.META_ARCHITECTURE": "GeneralizedRCNN", "T.MASK_ON": True, "T.ROI_MASK_HEAD.NUM_CONV": 4}
MASK_PAIRS = {
    "R18-R101": {"MODEL.RESNETS.DEPTH": 18, "MODEL.WEIGHTS": "pretrained/r18-r101mask.pth", "T.RESNETS.DEPTH": 101,
                 "TEACHER.CONFIG_FILE": "model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"},
    "R50-R101": {"MODEL.RESNETS.DEPTH": 50, "MODEL.WEIGHTS": "pretrained/r50-r101mask.pth", "T.RESNETS.DEPTH": 101,
                 "TEACHER.CONFIG_FILE": "model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"},
    "MV2-R50": {"MODEL.BACKBONE.NAME": "build_mobilenetv2_fpn_backbone", "MODEL.WEIGHTS": "pretrained/mv2-r50mask.pth",
                "T.RESNETS.DEPTH": 50,
                "TEACHER.CONFIG_FILE": "model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"},
}
# The ReviewKD release's HCL weights of its Mask configs.
MASK_REVIEWKD_WEIGHT = {"R18-R101": 1.5, "R50-R101": 0.8, "MV2-R50": 1.0}
RETINA = {"MODEL.META_ARCHITECTURE": "DistillDetector", "KD.STUDENT_ARCHITECTURE": "RetinaNet",
          "MODEL.BACKBONE.NAME": "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH": 50,
          "MODEL.RESNETS.OUT_FEATURES": ["res3", "res4", "res5"], "MODEL.FPN.IN_FEATURES": ["res3", "res4", "res5"],
          "MODEL.ANCHOR_GENERATOR.SIZES": RETINA_SIZES, "MODEL.RETINANET.IOU_THRESHOLDS": [0.4, 0.5],
          "MODEL.RETINANET.IOU_LABELS": [0, -1, 1], "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.1,
          "MODEL.PIXEL_STD": [1.0, 1.0, 1.0], "INPUT.FORMAT": "BGR", "MODEL.MASK_ON": False,
          "T.META_ARCHITECTURE": "RetinaNet", "T.ANCHOR_GENERATOR.SIZES": RETINA_SIZES}
RT101 = {"TEACHER.CONFIG_FILE": "model_zoo:COCO-Detection/retinanet_R_101_FPN_3x.yaml", "T.RESNETS.DEPTH": 101,
         "T.RESNETS.NUM_GROUPS": 1, "MODEL.WEIGHTS": "pretrained/r50-rt101.pth"}
RELEASE_RT = {"SOLVER.IMS_PER_BATCH": 8, "SOLVER.BASE_LR": 0.005, "SOLVER.MAX_ITER": 180000,
              "SOLVER.STEPS": [120000, 160000]}
# DiffKD's detection schedule: mmdetection 2x (24 epochs of 16 images ~ 180k iterations).
TWO_X = {"SOLVER.IMS_PER_BATCH": 16, "SOLVER.MAX_ITER": 180000, "SOLVER.STEPS": [120000, 160000]}
DIFFKD_RT = {**RETINA, **TWO_X, "SOLVER.BASE_LR": 0.01, "KD.TYPE": "NONE", "KD.DIFFKD.ENABLED": True,
             "KD.DIFFKD.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"], "KD.DIFFKD.DENSE_OUTPUTS": ["cls", "reg"],
             "KD.DIFFKD.LOSS_WEIGHT": 5.0, "KD.DIFFKD.DIFF_WEIGHT": 1.0, "KD.DIFFKD.REG_WEIGHT": 0.0,
             "KD.REVIEWKD.ENABLED": False, "KD.DENSE.TYPE": "NONE", "DEEPKD.ENABLED": False}
X101 = {"T.RESNETS.DEPTH": 101, "T.RESNETS.NUM_GROUPS": 32, "T.RESNETS.WIDTH_PER_GROUP": 8,
        "T.RESNETS.STRIDE_IN_1X1": False, "T.PIXEL_STD": [57.375, 57.120, 58.395]}
CMX101 = {**X101, "T.ROI_HEADS.NAME": "CascadeROIHeads", "T.MASK_ON": True, "T.META_ARCHITECTURE": "GeneralizedRCNN",
          "T.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True, "T.RPN.POST_NMS_TOPK_TRAIN": 2000}
DIFFKD_CM = {**TWO_X, **CMX101, "SOLVER.BASE_LR": 0.02, "MODEL.META_ARCHITECTURE": "DeepKDRCNN",
             "MODEL.RESNETS.DEPTH": 50, "MODEL.MASK_ON": False, "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
             "MODEL.WEIGHTS": "pretrained/r50-cmx101.pth", "KD.TYPE": "NONE", "KD.DIFFKD.ENABLED": True,
             "KD.DIFFKD.REG_WEIGHT": 0.0, "KD.DIFFKD.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
             "TEACHER.CONFIG_FILE": str(CONFIGS / "teachers" / "cascade_mask_rcnn_X_101_32x8d_FPN_3x.yaml")}
DIFFKD_RX = {**DIFFKD_RT, **X101, "MODEL.WEIGHTS": "pretrained/r50-rtx101.pth",
             "TEACHER.CONFIG_FILE": str(CONFIGS / "teachers" / "retinanet_X_101_32x8d_FPN_3x.yaml")}
ROWS = {
    **{f"ReviewKD-{pair}-Mask.yaml": {**MASK_SCHEDULE, **values, "KD.TYPE": "NONE", "KD.REVIEWKD.ENABLED": True,
                                      "KD.REVIEWKD.LOSS_WEIGHT": MASK_REVIEWKD_WEIGHT[pair], "DEEPKD.ENABLED": False}
       for pair, values in MASK_PAIRS.items()},
    **{f"ReviewKD-DKD-{pair}-Mask.yaml": {**MASK_SCHEDULE, **values, "KD.TYPE": "DKD", "KD.REVIEWKD.ENABLED": True,
                                          "KD.REVIEWKD.LOSS_WEIGHT": MASK_REVIEWKD_WEIGHT[pair], "DEEPKD.ENABLED": True}
       for pair, values in MASK_PAIRS.items()},
    **{f"Base-{pair}-Mask.yaml": {**MASK_SCHEDULE, **values, "KD.TYPE": "DKD", "KD.REVIEWKD.ENABLED": False}
       for pair, values in MASK_PAIRS.items()},
    "Base-DeepKD-RetinaNet.yaml": {**RETINA, **RT101, **RELEASE_RT, "KD.TYPE": "NONE"},
    "ReviewKD-RT50-RT101.yaml": {**RETINA, **RT101, **RELEASE_RT, "KD.TYPE": "NONE", "KD.REVIEWKD.ENABLED": True,
                                 "KD.REVIEWKD.LOSS_WEIGHT": 1.0,
                                 "KD.REVIEWKD.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"]},
    "DiffKD-RT50-RT101.yaml": {**DIFFKD_RT, **RT101, "KD.DIFFKD.ATTENTION": False},
    "DiffKD-Att-RT50-RT101.yaml": {**DIFFKD_RT, **RT101, "KD.DIFFKD.ATTENTION": True},
    "DiffKD-DKD-RT50-RT101.yaml": {**DIFFKD_RT, **RT101, "KD.DIFFKD.ATTENTION": False, "KD.DENSE.TYPE": "DKD",
                                   "DEEPKD.ENABLED": True},
    "DiffKD-Att-R50-R101.yaml": {"MODEL.META_ARCHITECTURE": "DeepKDRCNN", "MODEL.RESNETS.DEPTH": 50,
                                 "MODEL.WEIGHTS": "pretrained/r50-r101.pth", "KD.TYPE": "NONE",
                                 "KD.DIFFKD.ENABLED": True, "KD.DIFFKD.ATTENTION": True, "KD.DIFFKD.REG_WEIGHT": 1.0,
                                 "TEACHER.CONFIG_FILE": "model_zoo:COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
                                 "T.RESNETS.DEPTH": 101, "SOLVER.BASE_LR": 0.02, "SOLVER.MAX_ITER": 90000},
    "DiffKD-R50-CMX101.yaml": {**DIFFKD_CM, "KD.DIFFKD.ATTENTION": False},
    "DiffKD-Att-R50-CMX101.yaml": {**DIFFKD_CM, "KD.DIFFKD.ATTENTION": True},
    "DiffKD-RT50-RTX101.yaml": {**DIFFKD_RX, "KD.DIFFKD.ATTENTION": False},
    "DiffKD-Att-RT50-RTX101.yaml": {**DIFFKD_RX, "KD.DIFFKD.ATTENTION": True},
    # The two teachers of Table 5 are plain detectors of their own (trainable with train_net.py).
    "teachers/cascade_mask_rcnn_X_101_32x8d_FPN_3x.yaml": {
        **{"MODEL." + k[2:]: v for k, v in CMX101.items()}, "KD.TYPE": "NONE", "SOLVER.IMS_PER_BATCH": 16,
        "SOLVER.BASE_LR": 0.02, "SOLVER.MAX_ITER": 270000, "SOLVER.STEPS": [210000, 250000],
        "MODEL.ROI_MASK_HEAD.NUM_CONV": 4, "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"},
    "teachers/retinanet_X_101_32x8d_FPN_3x.yaml": {
        **{"MODEL." + k[2:]: v for k, v in X101.items()}, "MODEL.META_ARCHITECTURE": "RetinaNet",
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.0, "MODEL.ANCHOR_GENERATOR.SIZES": RETINA_SIZES,
        "MODEL.BACKBONE.NAME": "build_retinanet_resnet_fpn_backbone", "KD.TYPE": "NONE", "SOLVER.IMS_PER_BATCH": 16,
        "SOLVER.BASE_LR": 0.01, "SOLVER.MAX_ITER": 270000, "SOLVER.STEPS": [210000, 250000],
        "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"},
}
ROW_PATHS = [p for p in PATHS if os.path.relpath(p, CONFIGS) in ROWS]


def _approx_equal(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12)
    return a == b


def test_every_row_of_issue_21_has_its_config():
    assert sorted(os.path.relpath(p, CONFIGS) for p in ROW_PATHS) == sorted(ROWS)


@pytest.mark.parametrize("path", ROW_PATHS, ids=[os.path.relpath(p, CONFIGS) for p in ROW_PATHS])
def test_mask_retinanet_and_diffkd_rows_merge_to_their_published_recipe(path):
    """Each new config merges with the project's merge function and holds the values that define
    its row (teacher config, architecture, learning rate, schedule, batch, masks, anchors); the
    teacher is resolved from TEACHER.CONFIG_FILE as at start-up. No model is built here."""
    cfg = merge_config_file(add_data_config(add_deepkd_config(get_cfg())), path)
    expected = ROWS[os.path.relpath(path, CONFIGS)]
    teacher = resolve_teacher_cfg(cfg).MODEL if any(k.startswith("T.") for k in expected) else None
    for key, value in expected.items():
        got = _get(teacher, key[2:]) if key.startswith("T.") else _get(cfg, key)
        assert _approx_equal(got, value), f"{key}: {got!r} != {value!r}"
    assert cfg.TEACHER.INPUT_FORMAT == "BGR" and not cfg.TEACHER.MODEL.WEIGHTS  # teacher.* of MODEL.WEIGHTS
    if teacher is not None:
        assert teacher.META_ARCHITECTURE not in ("DeepKDRCNN", "DistillDetector")


def test_retinanet_release_anchor_sizes_are_the_releases_expression():
    # The release writes them as a python expression (!!python/object/apply:eval); ours are numbers.
    cfg = merge_config_file(add_data_config(add_deepkd_config(get_cfg())), str(CONFIGS / "ReviewKD-RT50-RT101.yaml"))
    assert [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES] == RETINA_SIZES


@pytest.mark.parametrize(
    "path", [p for p in PATHS if p not in ROW_PATHS], ids=[os.path.relpath(p, CONFIGS) for p in PATHS if p not in ROW_PATHS]
)
def test_every_config_resolves_to_its_student_and_teacher(path):
    cfg = merge_config_file(add_data_config(add_deepkd_config(get_cfg())), path)
    fmt, student, teacher = EXPECTED[_group(path)]
    assert cfg.INPUT.FORMAT == fmt and cfg.TEACHER.INPUT_FORMAT == "BGR"
    for key, value in student.items():
        assert _get(cfg.MODEL, key) == value, key
    if teacher is not None:
        t = resolve_teacher_cfg(cfg).MODEL
        for key, value in teacher.items():
            assert _get(t, key) == value, key


def test_teacher_starts_from_the_student_or_its_config_file():
    cfg = get_deepkd_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DeepKDRCNN"
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.TEACHER.MODEL.RESNETS.DEPTH = 34  # the one difference stated
    t = resolve_teacher_cfg(cfg).MODEL
    assert t.META_ARCHITECTURE == "GeneralizedRCNN"  # a plain detector, not DeepKDRCNN
    assert (t.RESNETS.DEPTH, t.RESNETS.RES2_OUT_CHANNELS, t.ROI_HEADS.NUM_CLASSES) == (34, 64, 3)
    assert list(t.PIXEL_STD) == [58.395, 57.12, 57.375]  # inherited from the student

    # A teacher value equal to detectron2's default while the student differs: its config file states it.
    cfg.TEACHER.CONFIG_FILE = "model_zoo:COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    cfg.TEACHER.MODEL.RESNETS.DEPTH = 50  # detectron2's default: does not override the file
    cfg.TEACHER.MODEL.ROI_HEADS.NUM_CLASSES = 3
    t = resolve_teacher_cfg(cfg).MODEL
    assert (t.RESNETS.DEPTH, t.RESNETS.RES2_OUT_CHANNELS, t.ROI_HEADS.NUM_CLASSES) == (101, 256, 3)
    assert list(t.PIXEL_STD) == [1.0, 1.0, 1.0]


def _merged(path):
    cfg = add_data_config(add_deepkd_config(get_cfg()))
    cfg.merge_from_file(path)
    return cfg


def test_detection_yaml_writes_each_setting_once():
    """Along a config's _BASE_ chain a key is set again only to change its value; a file with a
    base holds only what differs from that base; no teacher block restates the Faster R-CNN
    settings (they live once, in the project base, for the student)."""
    import yaml

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield prefix + k, v

    stated_anyway = {"MODEL.RESNETS.DEPTH"}  # the pair's depth, named in its file
    for path in PATHS:
        data = yaml.safe_load(open(path)) or {}
        if "_BASE_" in data:
            base = _merged(os.path.join(os.path.dirname(path), data["_BASE_"]))
            for key, value in flat({k: v for k, v in data.items() if k != "_BASE_"}):
                assert key in stated_anyway or str(_get(base, key)) != str(value), (
                    f"{os.path.relpath(path, CONFIGS)} restates {key}: {value} (its base has it already)"
                )
        seen, p = {}, path
        while p:
            data = yaml.safe_load(open(p)) or {}
            for key, _value in flat({k: v for k, v in data.items() if k != "_BASE_"}):
                seen.setdefault(key, p)
            p = os.path.join(os.path.dirname(p), data["_BASE_"]) if "_BASE_" in data else None
        # The class count of your own data (0: from its json) is a dataset setting, stated once in
        # custom/Base-Custom.yaml for both detectors, not an architecture restated for the teacher.
        teacher_keys = sorted(k for k in seen if k.startswith("TEACHER.MODEL.")
                              and not (k.endswith(".NUM_CLASSES") and "custom" in path))
        assert teacher_keys in ([], ["TEACHER.MODEL.WEIGHTS"]), (path, teacher_keys)
