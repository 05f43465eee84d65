"""Tiny detectors for the detection tests: a ready CPU config and random image batches.

Kept out of the package on purpose: these sizes are for tests only.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode as CN
from detectron2.structures import Boxes, Instances, PolygonMasks

from deepkd_det.det.config import get_deepkd_cfg

STUDENT_MEAN = [123.675, 116.28, 103.53]
STUDENT_STD = [58.395, 57.12, 57.375]


def make_batch(n=2, h=64, w=80, num_classes=3, seed=0, masks=False):
    """Random images (0..255, student format) with two ground-truth boxes each (and, with
    ``masks``, each box's full rectangle as its polygon mask)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        inst = Instances((h, w))
        x0 = torch.randint(0, w // 2, (2,), generator=g).float()
        y0 = torch.randint(0, h // 2, (2,), generator=g).float()
        inst.gt_boxes = Boxes(torch.stack([x0, y0, x0 + w / 3, y0 + h / 3], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (2,), generator=g)
        if masks:
            inst.gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in
                                          inst.gt_boxes.tensor.tolist()])
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def _make_tiny_model(model: CN, num_classes: int) -> None:
    """R-18-FPN Faster R-CNN sized for 64-128 px images on CPU."""
    model.META_ARCHITECTURE = "GeneralizedRCNN"
    model.WEIGHTS = ""
    model.DEVICE = "cpu"
    model.BACKBONE.NAME = "build_resnet_fpn_backbone"
    model.BACKBONE.FREEZE_AT = 0
    model.RESNETS.DEPTH = 18
    model.RESNETS.RES2_OUT_CHANNELS = 64
    model.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    model.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    model.FPN.OUT_CHANNELS = 64
    model.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    model.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    model.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    model.RPN.PRE_NMS_TOPK_TRAIN = 256
    model.RPN.PRE_NMS_TOPK_TEST = 128
    model.RPN.POST_NMS_TOPK_TRAIN = 64
    model.RPN.POST_NMS_TOPK_TEST = 32
    model.RPN.BATCH_SIZE_PER_IMAGE = 64
    model.ROI_HEADS.NAME = "StandardROIHeads"
    model.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    model.ROI_HEADS.NUM_CLASSES = num_classes
    model.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    model.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    model.ROI_BOX_HEAD.NUM_FC = 2
    model.ROI_BOX_HEAD.FC_DIM = 128
    model.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    model.MASK_ON = False


def get_tiny_cfg(
    num_classes: int = 3, kd_type: str = "DKD", deepkd: bool = True, random_teacher: bool = True
) -> CN:
    """A ready CPU config: R-18-FPN student and R-18-FPN teacher (FPN 64 channels, FC 128),
    64-128 px images, 64 proposals per image after NMS, 32 sampled RoIs per image.

    ``kd_type`` "NONE" gives a plain GeneralizedRCNN; ``deepkd`` turns on DEEPKD (its top-k mask is off here; tests that want one set it).
    ``random_teacher`` sets TEACHER.ALLOW_RANDOM_INIT (tests and smoke runs only; set
    TEACHER.MODEL.WEIGHTS for a real teacher). Not frozen, so callers can change it.
    """
    cfg = get_deepkd_cfg()
    _make_tiny_model(cfg.MODEL, num_classes)
    _make_tiny_model(cfg.TEACHER.MODEL, num_classes)
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN" if kd_type == "NONE" else "DeepKDRCNN"
    cfg.KD.TYPE = kd_type
    cfg.TEACHER.ALLOW_RANDOM_INIT = bool(random_teacher)
    cfg.DEEPKD.ENABLED = bool(deepkd) and kd_type != "NONE"
    cfg.DEEPKD.TOPK.MODE = "off"
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 80, 96)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = 20
    cfg.SOLVER.STEPS = (15,)
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 10
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.VIS_PERIOD = 0
    return cfg


def _make_tiny_retinanet(model: CN, num_classes: int) -> None:
    """The tiny R-18-FPN as a RetinaNet (FPN p3-p6 + the head on them, 3 anchors a location)."""
    _make_tiny_model(model, num_classes)
    model.META_ARCHITECTURE = "RetinaNet"
    model.RETINANET.NUM_CLASSES = num_classes
    model.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    model.RETINANET.NUM_CONVS = 1
    model.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128]]
    model.RETINANET.TOPK_CANDIDATES_TEST = 100


def get_tiny_retinanet_cfg(num_classes: int = 3, dense: str = "DKD", deepkd: bool = True,
                           diffkd_outputs=(), random_teacher: bool = True) -> CN:
    """``get_tiny_cfg`` with a RetinaNet student and teacher inside DistillDetector: KD.DENSE.TYPE
    ``dense``, optional DiffKD on the FPN levels the head reads and on ``diffkd_outputs``."""
    cfg = get_tiny_cfg(num_classes, kd_type="NONE", deepkd=False, random_teacher=random_teacher)
    _make_tiny_retinanet(cfg.MODEL, num_classes)
    _make_tiny_retinanet(cfg.TEACHER.MODEL, num_classes)
    cfg.MODEL.META_ARCHITECTURE = "DistillDetector"
    cfg.KD.STUDENT_ARCHITECTURE = "RetinaNet"
    cfg.KD.DENSE.TYPE = dense
    cfg.DEEPKD.ENABLED = bool(deepkd) and dense != "NONE"
    if diffkd_outputs:
        cfg.KD.DIFFKD.ENABLED = True
        cfg.KD.DIFFKD.IN_FEATURES = ["p3", "p4", "p5", "p6"]
        cfg.KD.DIFFKD.DENSE_OUTPUTS = list(diffkd_outputs)
        cfg.KD.DIFFKD.INFERENCE_STEPS = 2
    return cfg


def get_tiny_mask_cfg(num_classes: int = 3, kd_type: str = "DKD", deepkd: bool = True, random_teacher: bool = True,
                      student_mask: bool = True, teacher_mask: bool = True) -> CN:
    """``get_tiny_cfg`` with a mask head (4x4 conv upsampling, 14 px RoIs) on the student and/or
    the teacher: a Mask R-CNN pair, or a Faster R-CNN student of a Mask R-CNN teacher."""
    cfg = get_tiny_cfg(num_classes, kd_type=kd_type, deepkd=deepkd, random_teacher=random_teacher)
    for model, on in ((cfg.MODEL, student_mask), (cfg.TEACHER.MODEL, teacher_mask)):
        model.MASK_ON = on
        model.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
        model.ROI_MASK_HEAD.NUM_CONV = 1
        model.ROI_MASK_HEAD.CONV_DIM = 32
        model.ROI_MASK_HEAD.POOLER_RESOLUTION = 7
    return cfg
