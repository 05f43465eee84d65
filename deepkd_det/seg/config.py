"""Configuration of the segmentation trainer (yacs; files and overrides as in classification:
``deepkd_det.core.cfgfile``). ``load_seg_cfg(path, opts)`` merges and validates; every problem is
one :class:`ConfigError` naming the key."""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

from yacs.config import CfgNode as CN

from deepkd_det.core.cfgfile import ConfigError, merge_file, merge_opts
from deepkd_det.core.settings import deepkd_node, validate_deepkd_settings

from .models import BACKBONES, HEADS

__all__ = ["ConfigError", "DATASET_TYPES", "DISTILLER_TYPES", "get_seg_cfg", "load_seg_cfg", "seg_output_dir",
           "validate_seg_cfg"]

DATASET_TYPES = ("synthetic", "cityscapes", "folder")
DISTILLER_TYPES = ("NONE", "KD", "DKD", "DIFFKD")

_C = CN()
_C.SEED = 0
_C.DEVICE = "auto"  # auto (cuda when available), cpu, cuda
_C.OUTPUT_DIR = "output/seg/run"

_C.DATASET = CN()
_C.DATASET.TYPE = "synthetic"  # synthetic | cityscapes | folder (docs/segmentation.md, "Data")
_C.DATASET.ROOT = ""
_C.DATASET.TRAIN_SPLIT = "train"
_C.DATASET.VAL_SPLIT = "val"
_C.DATASET.CLASSES = []  # folder: class names (empty: <ROOT>/classes.txt)
_C.DATASET.CHECK_VALUES = True  # read every label once at start-up (values within the class list)
_C.DATASET.NUM_WORKERS = 0
_C.DATASET.SYNTHETIC = CN()
_C.DATASET.SYNTHETIC.TRAIN_IMAGES = 200  # the first N scenes of the training stream
_C.DATASET.SYNTHETIC.VAL_IMAGES = 50
_C.DATASET.SYNTHETIC.SIZE = 64
_C.DATASET.SYNTHETIC.NUM_SHAPES = 3  # classes: background + this many shapes
_C.DATASET.SYNTHETIC.MAX_OBJECTS = 4
_C.DATASET.SYNTHETIC.SEED = 0
_C.DATASET.SYNTHETIC.COLOUR_JITTER = 70.0  # a shape's colour: its class colour +- this per channel; -1: any colour

_C.INPUT = CN()
_C.INPUT.MEAN = [123.675, 116.28, 103.53]  # RGB, 0-255 (ImageNet)
_C.INPUT.STD = [58.395, 57.12, 57.375]
_C.INPUT.SCALE_RANGE = [0.5, 2.0]  # random scale (CIRKD / DiffKD appendix B.3)
_C.INPUT.CROP_SIZE = [512, 1024]  # H, W
_C.INPUT.FLIP = True

_C.MODEL = CN()
_C.MODEL.BACKBONE = "resnet18"  # resnet18 | resnet101 | mobilenetv2 | tiny (dilated, output stride 8)
_C.MODEL.HEAD = "deeplabv3"  # deeplabv3 | pspnet
_C.MODEL.WIDTH = 16  # tiny backbone only
_C.MODEL.HEAD_CHANNELS = 0  # 0: the papers' widths (ASPP 256, PSP 512)
_C.MODEL.ASPP_RATES = [12, 24, 36]
_C.MODEL.PRETRAINED = ""  # torchvision ImageNet state dict of the backbone ("": from scratch)

_C.TEACHER = CN()  # the frozen teacher: its architecture and its trained weights
_C.TEACHER.BACKBONE = "resnet101"
_C.TEACHER.HEAD = "deeplabv3"
_C.TEACHER.WIDTH = 16
_C.TEACHER.HEAD_CHANNELS = 0
_C.TEACHER.ASPP_RATES = [12, 24, 36]
_C.TEACHER.CKPT = ""  # a file this trainer wrote (student_final.pth / latest.pth) or {"model": state_dict}

_C.DISTILLER = CN()
_C.DISTILLER.TYPE = "NONE"  # NONE | KD | DKD | DIFFKD (+ DEEPKD.ENABLED: DeepKD on top)

_C.KD = CN()  # per-pixel KD (CIRKD's pixel-wise KD form): CE + w T^2 KL(p_t || p_s) per pixel
_C.KD.CE_WEIGHT = 1.0
_C.KD.KD_WEIGHT = 1.0
_C.KD.TEMPERATURE = 1.0
_C.KD.WARMUP_ITERS = 0

_C.DKD = CN()  # per-pixel DKD: CE + w (alpha TCKD + beta NCKD)
_C.DKD.CE_WEIGHT = 1.0
_C.DKD.ALPHA = 1.0
_C.DKD.BETA = 1.0
_C.DKD.T = 1.0
_C.DKD.WARMUP_ITERS = 0

_C.DIFFKD = CN()  # DiffKD on the predicted maps (C channels, no autoencoder)
_C.DIFFKD.CE_WEIGHT = 1.0
_C.DIFFKD.KD_WEIGHT = 1.0  # per-pixel KL(teacher || denoised student), split into TCKD + NCKD
_C.DIFFKD.DIFF_WEIGHT = 1.0  # diffusion (noise prediction) loss
_C.DIFFKD.INFERENCE_STEPS = 5
_C.DIFFKD.WARMUP_ITERS = 0

_C.DEEPKD = deepkd_node(CN)  # shared node: deepkd_det/core/settings.py documents every key

_C.SOLVER = CN()
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.IMS_PER_BATCH = 8
_C.SOLVER.BASE_LR = 0.01
_C.SOLVER.POLY_POWER = 0.9  # lr = BASE_LR * (1 - iter / MAX_ITER) ** POLY_POWER
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.CHECKPOINT_PERIOD = 4000  # iterations between latest.pth writes (and after the last)

_C.TEST = CN()
_C.TEST.EVAL_PERIOD = 4000  # iterations between mIoU evaluations (and after the last)
# Which classes mIoU averages over (seg/evaluation.py): "union" (detectron2 v0.6, mmsegmentation:
# classes in the ground truth or the predictions) or "gt" (detectron2 main: classes in the ground truth).
_C.TEST.MIOU_CLASSES = "union"

_C.LOG = CN()
_C.LOG.PERIOD = 20  # iterations between training-loss rows in metrics.jsonl


def get_seg_cfg() -> CN:
    return _C.clone()


def load_seg_cfg(path: Optional[str] = None, opts: Iterable[str] = (), validate: bool = True) -> CN:
    """Defaults, then ``path`` (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides; validated, frozen."""
    cfg = get_seg_cfg()
    if path:
        merge_file(cfg, path)
    merge_opts(cfg, opts)
    if validate:
        validate_seg_cfg(cfg)
    cfg.freeze()
    return cfg


def seg_output_dir(cfg: CN) -> str:
    return cfg.OUTPUT_DIR


def validate_seg_cfg(cfg: CN, num_classes: Optional[int] = None) -> None:
    errors: List[str] = []

    def need(cond, msg):
        if not cond:
            errors.append(msg)

    d, s = cfg.DATASET, cfg.SOLVER
    need(d.TYPE in DATASET_TYPES, f"DATASET.TYPE must be one of {DATASET_TYPES}, got {d.TYPE!r}")
    need(d.NUM_WORKERS >= 0, "DATASET.NUM_WORKERS must be >= 0")
    syn = d.SYNTHETIC
    need(syn.TRAIN_IMAGES >= 1 and syn.VAL_IMAGES >= 1, "DATASET.SYNTHETIC.TRAIN_IMAGES and VAL_IMAGES must be >= 1")
    need(syn.SIZE >= 16, f"DATASET.SYNTHETIC.SIZE must be >= 16, got {syn.SIZE}")
    need(cfg.DEVICE in ("auto", "cpu", "cuda"), f"DEVICE must be auto, cpu or cuda, got {cfg.DEVICE!r}")
    i = cfg.INPUT
    need(len(i.MEAN) == 3 and len(i.STD) == 3 and all(v > 0 for v in i.STD), "INPUT.MEAN / INPUT.STD need 3 values (STD > 0)")
    need(len(i.SCALE_RANGE) == 2 and 0 < i.SCALE_RANGE[0] <= i.SCALE_RANGE[1],
         f"INPUT.SCALE_RANGE must be [low, high] with 0 < low <= high, got {list(i.SCALE_RANGE)}")
    need(len(i.CROP_SIZE) == 2 and all(int(v) >= 8 for v in i.CROP_SIZE),
         f"INPUT.CROP_SIZE must be [H, W], each >= 8, got {list(i.CROP_SIZE)}")
    for node in ("MODEL", "TEACHER"):
        m = cfg[node]
        need(m.BACKBONE in BACKBONES, f"{node}.BACKBONE must be one of {BACKBONES}, got {m.BACKBONE!r}")
        need(m.HEAD in HEADS, f"{node}.HEAD must be one of {HEADS}, got {m.HEAD!r}")
        need(m.WIDTH >= 1 and m.HEAD_CHANNELS >= 0, f"{node}.WIDTH must be >= 1 and {node}.HEAD_CHANNELS >= 0")
    if cfg.MODEL.PRETRAINED:
        need(os.path.isfile(cfg.MODEL.PRETRAINED), f"MODEL.PRETRAINED: file not found: {cfg.MODEL.PRETRAINED}")
    t = cfg.DISTILLER.TYPE
    need(t in DISTILLER_TYPES, f"DISTILLER.TYPE must be one of {DISTILLER_TYPES}, got {t!r}")
    if t != "NONE":
        need(bool(cfg.TEACHER.CKPT), f"DISTILLER.TYPE {t} needs the teacher's weights: set TEACHER.CKPT")
    if cfg.DEEPKD.ENABLED:
        need(t != "NONE", "DEEPKD.ENABLED needs a distillation method (DISTILLER.TYPE KD, DKD or DIFFKD)")
    for name, keys in (("KD", ("CE_WEIGHT", "KD_WEIGHT", "WARMUP_ITERS")), ("DKD", ("CE_WEIGHT", "ALPHA", "BETA", "WARMUP_ITERS")),
                       ("DIFFKD", ("CE_WEIGHT", "KD_WEIGHT", "DIFF_WEIGHT", "WARMUP_ITERS"))):
        for key in keys:
            need(cfg[name][key] >= 0, f"{name}.{key} must be >= 0, got {cfg[name][key]}")
    need(cfg.KD.TEMPERATURE > 0 and cfg.DKD.T > 0, "KD.TEMPERATURE and DKD.T must be positive")
    need(1 <= cfg.DIFFKD.INFERENCE_STEPS <= 500, "DIFFKD.INFERENCE_STEPS must lie in 1..500")
    need(cfg.TEST.MIOU_CLASSES in ("union", "gt"), f"TEST.MIOU_CLASSES must be 'union' or 'gt', got {cfg.TEST.MIOU_CLASSES!r}")
    need(s.MAX_ITER >= 1 and s.IMS_PER_BATCH >= 1, "SOLVER.MAX_ITER and SOLVER.IMS_PER_BATCH must be >= 1")
    need(s.BASE_LR > 0, f"SOLVER.BASE_LR must be positive, got {s.BASE_LR}")
    need(s.POLY_POWER >= 0, "SOLVER.POLY_POWER must be >= 0")
    need(0.0 <= s.MOMENTUM < 1.0, f"SOLVER.MOMENTUM must lie in [0, 1), got {s.MOMENTUM}")
    need(s.WEIGHT_DECAY >= 0, "SOLVER.WEIGHT_DECAY must be >= 0")
    need(s.CHECKPOINT_PERIOD >= 1 and cfg.TEST.EVAL_PERIOD >= 1 and cfg.LOG.PERIOD >= 1,
         "SOLVER.CHECKPOINT_PERIOD, TEST.EVAL_PERIOD and LOG.PERIOD must be >= 1")
    num = num_classes or (syn.NUM_SHAPES + 1 if d.TYPE == "synthetic" else 19 if d.TYPE == "cityscapes" else None)
    errors.extend(validate_deepkd_settings(cfg.DEEPKD, s.MOMENTUM, num - 1 if num else None))
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
