"""Reading checkpoints and renaming ImageNet backbone weights to detectron2's layout.

Pure key renaming, shared by ``tools/make_kd_weights.py``, the teacher loader and
``DeepKDCheckpointer``. A checkpoint is untrusted input: ``.pth`` files are read with
``torch.load(weights_only=True)``; ``.pkl`` files (detectron2 model zoo) are pickles and are
read through detectron2's checkpointer, so only trusted ``.pkl`` files should be loaded.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Dict, Mapping, Tuple

import numpy as np
import torch

from deepkd_det.core.io import load_weights_only

__all__ = [
    "STUDENT_PREFIX",
    "TEACHER_PREFIX",
    "IGNORED_CHECKPOINT_KEYS",
    "read_checkpoint",
    "torchvision_resnet_to_d2",
    "mobilenetv2_to_backbone",
    "student_backbone_from_imagenet",
    "detect_student_layout",
    "convert_student_keys",
    "frozen_bn_statistics",
    "absent_statistics_allowed",
    "StudentWeightsError",
    "imagenet_flavour",
    "IMAGENET_INPUT",
    "DETECTOR_KINDS",
    "detector_kind",
    "absent_teacher_modules",
]

logger = logging.getLogger(__name__)

STUDENT_PREFIX = "backbone.bottom_up."
TEACHER_PREFIX = "teacher."
# Present in old detectron2 checkpoints but not part of the model's state (non-persistent buffers).
IGNORED_CHECKPOINT_KEYS = re.compile(r"(^|\.)(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors\.")


class StudentWeightsError(ValueError):
    """MODEL.WEIGHTS does not fit the student: part of it would stay randomly initialised."""


def frozen_bn_statistics(module: torch.nn.Module, prefix: str = "") -> Dict[str, str]:
    """``{running_mean/var key: weight key}`` of every FrozenBatchNorm2d layer of ``module``."""
    from detectron2.layers import FrozenBatchNorm2d

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            base = f"{prefix}{name}." if name else prefix
            out[base + "running_mean"] = out[base + "running_var"] = base + "weight"
    return out


def absent_statistics_allowed(stats: Mapping[str, str], file_keys) -> set:
    """FrozenBN running statistics that may be absent from a file: all of them when the file
    holds none (a Caffe2 / old detectron2 file, statistics folded into weight and bias; detectron2
    then uses mean 0 / variance 1, which is right for such files), none otherwise: a file that
    holds some statistics must hold every one, or a layer would be normalised with made-up ones."""
    file_keys = set(file_keys)
    if any(k in file_keys for k in stats):
        return set()
    return {k for k, w in stats.items() if w in file_keys}


def _to_tensor(v):
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(state_dict, extra)`` of a checkpoint file.

    ``.pkl``: detectron2 / Caffe2 model-zoo pickles, via detectron2's checkpointer (trusted files
    only). Anything else: ``torch.load(weights_only=True)``; a dict with a ``"model"`` entry is a
    detectron2 checkpoint, a plain dict of tensors a bare state dict (torchvision weights).
    ``extra`` holds the other top-level entries (``__author__``, ``matching_heuristics``, ...).
    """
    from detectron2.utils.file_io import PathManager

    local = PathManager.get_local_path(path)
    if local.endswith(".pkl"):
        from detectron2.checkpoint import DetectionCheckpointer

        # A pickle: only load trusted .pkl files (see pretrained/README.md).
        data = DetectionCheckpointer(torch.nn.Module())._load_file(local)
    else:
        data = load_weights_only(local)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(data).__name__})")
    if "model" in data and isinstance(data["model"], Mapping):
        state, extra = data["model"], {k: v for k, v in data.items() if k != "model"}
    elif "state_dict" in data and isinstance(data["state_dict"], Mapping):
        state, extra = data["state_dict"], {k: v for k, v in data.items() if k != "state_dict"}
    else:
        state, extra = data, {}
    state = OrderedDict((k, _to_tensor(v)) for k, v in state.items())
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    return state, extra


# ---------------------------------------------------------------- ResNet

_TV_BN = re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(.+)$")
_TV_CONV = re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$")
_TV_DOWN = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


def _tv_resnet_key(key: str) -> str | None:
    """detectron2 name of one torchvision ResNet key; None for dropped keys (fc, counters)."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    m = _TV_CONV.match(key)
    if m:
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
    m = _TV_BN.match(key)
    if m:
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
    m = _TV_DOWN.match(key)
    if m:
        part = "shortcut.weight" if m[3] == "0" else f"shortcut.norm.{m[4]}"
        return f"res{int(m[1]) + 1}.{m[2]}.{part}"
    raise ValueError(f"unexpected key {key!r} in a torchvision ResNet state dict")


def torchvision_resnet_to_d2(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """torchvision ResNet names -> detectron2 ResNet names (no prefix); fc and counters dropped.

    ``layer1.0.conv1.weight`` -> ``res2.0.conv1.weight``, ``layer1.0.bn1.*`` -> ``res2.0.conv1.norm.*``,
    ``downsample.0/1`` -> ``shortcut`` / ``shortcut.norm``, ``conv1`` / ``bn1`` -> ``stem.conv1(.norm)``.
    """
    out = OrderedDict()
    for k, v in state.items():
        new = _tv_resnet_key(k)
        if new is not None:
            out[new] = v
    return out


# ---------------------------------------------------------------- MobileNetV2

# tonylins/pytorch-mobilenet-v2 layout (the mdistiller/ReviewKD MV2 student) -> torchvision.
_TONYLINS_EXPAND1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_TONYLINS_EXPAND = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_MV2_KEY = re.compile(r"^features\.(\d+)\.(.+)$")
_MV2_LAST_BACKBONE_BLOCK = 17  # features.18 (1x1 conv to 1280) is not part of the detection backbone


def _is_tonylins_mv2(state: Mapping[str, torch.Tensor]) -> bool:
    # features.1 (expand ratio 1) has conv.0-conv.4 there, conv.0.0-conv.2 in torchvision.
    return "features.1.conv.3.weight" in state


# MobileNetV2 keys outside the detection backbone, dropped wherever MV2 ImageNet weights are read
# (tools/make_kd_weights.py and the student loader of a combined file): the classifier (``fc`` in
# some files) and the d-li14 (tonylins) layout's last 1x1 conv ``conv.*``, torchvision's features.18.
_MV2_HEAD = ("classifier.", "conv.", "fc.")


def _mv2_key(key: str, tonylins: bool) -> str | None:
    """Backbone name of one MobileNetV2 ImageNet key; None for dropped keys."""
    if key.endswith("num_batches_tracked") or key.startswith(_MV2_HEAD):
        return None
    m = _MV2_KEY.match(key)
    if not m:
        raise ValueError(f"unexpected key {key!r} in a MobileNetV2 state dict")
    idx, rest = int(m[1]), m[2]
    if idx > _MV2_LAST_BACKBONE_BLOCK:
        return None
    if tonylins and idx > 0:
        parts = rest.split(".")  # conv.<i>.<param>
        table = _TONYLINS_EXPAND1 if idx == 1 else _TONYLINS_EXPAND
        if parts[0] != "conv" or len(parts) < 3 or parts[1] not in table:
            raise ValueError(f"unexpected key {key!r} in a MobileNetV2 (tonylins layout) state dict")
        rest = "conv." + table[parts[1]] + "." + ".".join(parts[2:])
    return f"features.{idx}.{rest}"


def mobilenetv2_to_backbone(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """MobileNetV2 ImageNet weights (torchvision or tonylins layout) -> this project's backbone names.

    The backbone uses torchvision's layers, so torchvision keys stay as they are; ``features.18``,
    the classifier and BN counters are dropped.
    """
    tonylins = _is_tonylins_mv2(state)
    out = OrderedDict()
    for k, v in state.items():
        new = _mv2_key(k, tonylins)
        if new is not None:
            out[new] = v
    return out


# ---------------------------------------------------------------- ImageNet flavours

# Input settings each kind of ImageNet ResNet weights was trained with (detectron2 keys).
IMAGENET_INPUT = {
    # detectron2's MSRA weights (ImageNetPretrained/MSRA/R-50.pkl, Caffe2): BN folded into
    # weight / bias, BGR 0-255 input minus the mean, stride in the 1x1 conv. The ReviewKD release's
    # R-50 pair uses them.
    "caffe2": {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
               "MODEL.PIXEL_STD": [1.0, 1.0, 1.0], "MODEL.RESNETS.STRIDE_IN_1X1": True},
    # torchvision weights: measured BN statistics, RGB input normalised per channel, stride in
    # the 3x3 conv.
    "torchvision": {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
                    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375], "MODEL.RESNETS.STRIDE_IN_1X1": False},
}

_C2_KEY = re.compile(r"^(conv1_w|res_conv1_bn_[sb]|res\d_\d+_branch\w+|fc1000_[wb])$")


def imagenet_flavour(state: Mapping[str, torch.Tensor], prefix: str = STUDENT_PREFIX) -> str | None:
    """Which ImageNet weights the backbone keys under ``prefix`` hold: ``"caffe2"`` when no
    running statistic is stored or every running mean is 0 and every running variance 1 (BN
    folded into weight / bias), ``"torchvision"`` when the statistics were measured; None
    without any normalisation key."""
    stats = [(k, v) for k, v in state.items() if k.startswith(prefix) and k.endswith(("running_mean", "running_var"))]
    if not stats:
        has_norm = any(k.startswith(prefix) and ".norm." in k for k in state)
        return "caffe2" if has_norm else None
    folded = all(
        bool((v == (0.0 if k.endswith("running_mean") else 1.0)).all()) for k, v in stats
    )
    return "caffe2" if folded else "torchvision"


def _caffe2_resnet_to_d2(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """detectron2's MSRA (Caffe2) ResNet names -> detectron2 names, fc dropped; the folded
    normalisation layers get their explicit statistics (mean 0, variance 1, what detectron2 uses
    for such files), so the combined file holds every tensor of the backbone."""
    from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

    keys = [k for k in state if not k.endswith("_momentum")]
    bad = [k for k in keys if not _C2_KEY.match(k)]
    if bad:
        raise ValueError(f"unexpected keys in a Caffe2 (MSRA) ResNet file: {bad[:10]}")
    out = OrderedDict()
    for old, new in zip(keys, convert_basic_c2_names(keys)):
        if new.startswith("fc1000"):
            continue
        out[new] = state[old]
        if new.endswith(".norm.weight"):
            base = new[: -len("weight")]
            out[base + "running_mean"] = torch.zeros_like(state[old])
            out[base + "running_var"] = torch.ones_like(state[old])
    return out


def student_backbone_from_imagenet(
    state: Mapping[str, torch.Tensor], arch: str
) -> OrderedDict[str, torch.Tensor]:
    """ImageNet weights of the student -> ``backbone.bottom_up.*`` keys of the detector.

    ResNets: torchvision state dicts, or detectron2's MSRA Caffe2 files (``R-50.pkl``, the
    release's R-50 student); MobileNetV2: torchvision or tonylins layout."""
    if arch in ("R-18", "R-50"):
        caffe2 = any(_C2_KEY.match(k) for k in state)
        renamed = _caffe2_resnet_to_d2(state) if caffe2 else torchvision_resnet_to_d2(state)
        expected = 4 if arch == "R-50" else 3  # conv3 exists only in bottleneck blocks
        has_conv3 = any(k.endswith(".conv3.weight") for k in renamed)
        if has_conv3 != (expected == 4):
            raise ValueError(
                f"--student-arch {arch} does not match the weights (bottleneck blocks: {has_conv3})"
            )
    elif arch == "MV2":
        renamed = mobilenetv2_to_backbone(state)
    else:
        raise ValueError(f"student arch must be one of R-18, R-50, MV2, got {arch!r}")
    if not renamed:
        raise ValueError(f"no {arch} backbone weights found in the student file")
    return OrderedDict((STUDENT_PREFIX + k, v) for k, v in renamed.items())


# ---------------------------------------------------------------- layouts of combined files

# Anchor key of each student layout a combined (release) file may use, possibly under a prefix.
_LAYOUT_ANCHORS = (
    ("d2", "res2.0.conv1.weight"),
    ("d2-mv2", "features.1.conv.0.0.weight"),
    ("tonylins-mv2", "features.1.conv.3.weight"),
    ("torchvision-resnet", "layer1.0.conv1.weight"),
)


def detect_student_layout(state: Mapping[str, torch.Tensor]) -> Tuple[str, str] | None:
    """``(layout, prefix)`` of the student backbone keys of a state dict (teacher keys ignored)."""
    keys = [k for k in state if not k.startswith(TEACHER_PREFIX)]
    for layout, anchor in _LAYOUT_ANCHORS:
        for k in keys:
            if k.endswith(anchor) and (k == anchor or k[: -len(anchor)].endswith(".")):
                return layout, k[: -len(anchor)]
    return None


def convert_student_keys(state: Mapping[str, torch.Tensor], model_keys) -> OrderedDict[str, torch.Tensor]:
    """Rename the student backbone keys of a combined file to the model's ``backbone.bottom_up.*``.

    ``teacher.*`` keys and keys outside the detected student layout are left alone; nothing is
    renamed when the student keys are already in place.
    """
    model_keys = set(model_keys)
    found = detect_student_layout(state)
    if found is None:
        return OrderedDict(state)
    layout, prefix = found
    if prefix == STUDENT_PREFIX and layout in ("d2", "d2-mv2"):
        return OrderedDict(state)
    stripped = {
        k: k[len(prefix) :] for k in state if k.startswith(prefix) and not k.startswith(TEACHER_PREFIX)
    }
    if layout == "torchvision-resnet":
        heads = ("conv1.", "bn1.", "layer", "fc.")

        def rename(k):
            return _tv_resnet_key(k)
    elif layout in ("tonylins-mv2", "d2-mv2"):
        heads = ("features.",) + _MV2_HEAD
        tonylins = layout == "tonylins-mv2"

        def rename(k):
            return _mv2_key(k, tonylins)
    else:
        heads = ("stem.", "res")

        def rename(k):
            return k

    out = OrderedDict()
    moved = 0
    for k, v in state.items():
        short = stripped.get(k)
        if short is None or not short.startswith(heads):
            out[k] = v
            continue
        new = rename(short)
        if new is None:
            continue  # dropped on purpose (classifier, BN counters, features.18)
        new = STUDENT_PREFIX + new
        if new in model_keys:
            out[new] = v
            moved += 1
        else:
            out[k] = v  # keep it visible as an unexpected key
    logger.info(
        "Renamed %d student backbone keys (%s layout, prefix %r) to %s*",
        moved,
        layout,
        prefix,
        STUDENT_PREFIX,
    )
    return out


# ---------------------------------------------------------------- detector checkpoints (teachers)

# What ``detector_kind`` can tell apart, by the head keys of a detectron2 state dict.
DETECTOR_KINDS = ("Faster R-CNN", "Mask R-CNN", "Cascade R-CNN", "Cascade Mask R-CNN", "RetinaNet", "FCOS")
_CASCADE_PREDICTOR = re.compile(r"^roi_heads\.box_predictor\.\d+\.")


def detector_kind(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which detectron2 detector a state dict (no ``teacher.`` prefix) holds, from its head keys:
    R-CNNs by ``roi_heads.box_predictor.*`` (``box_predictor.<stage>.*``: Cascade; with
    ``roi_heads.mask_head.*``: Mask), the dense detectors by ``head.cls_score.*`` and
    ``head.bbox_pred.*`` without ROI heads (``head.ctrness.*``: FCOS, else RetinaNet). None for
    anything else (an ImageNet backbone, a backbone alone)."""
    keys = list(state)
    if not any(k.startswith("backbone.") for k in keys):
        return None
    if any(k.startswith("roi_heads.box_predictor.") for k in keys):
        kind = "Cascade R-CNN" if any(_CASCADE_PREDICTOR.match(k) for k in keys) else "Faster R-CNN"
        if any(k.startswith("roi_heads.mask_head.") for k in keys):
            kind = "Cascade Mask R-CNN" if kind.startswith("Cascade") else "Mask R-CNN"
        return kind
    if any(k.startswith("roi_heads.") for k in keys):
        return None
    if any(k.startswith("head.cls_score.") for k in keys) and any(k.startswith("head.bbox_pred.") for k in keys):
        return "FCOS" if any(k.startswith("head.ctrness.") for k in keys) else "RetinaNet"
    return None


# Teacher modules no distillation part runs: their weights may be absent from a combined file (the
# ReviewKD release builds its teachers with TEACHER.MODEL.MASK_ON False, so its Mask R-CNN pair
# files need not hold the teacher's mask head).
_TEACHER_NEVER_RUN = ("roi_heads.mask_head.", "roi_heads.keypoint_head.")
# Teacher modules run only for the parts that need them (``DistillPart.needs``): the release's
# RetinaNet teacher is its backbone alone (ReviewKD distils features), so ``r50-rt101.pth`` holds
# ``teacher.backbone.*`` and no ``teacher.head.*``.
_TEACHER_RUN_FOR = {"box_head": ("proposal_generator.", "roi_heads."), "dense_head": ("head.",)}


def absent_teacher_modules(own_keys, file_keys, needs=None) -> Dict[str, list]:
    """``{module prefix: its keys}`` of the teacher modules a file may leave out: modules no part
    runs (mask and keypoint heads), and, when ``needs`` (the union of the parts' ``needs``, a set
    of "features", "box_head", "dense_head") is given, the heads no part needs. A module counts
    only when the file holds none of its keys (a partly present module is a damaged file: its
    missing keys stay missing). ``needs`` None: every head may be needed. Keys without the
    ``teacher.`` prefix on both sides."""
    file_keys = set(file_keys)
    prefixes = list(_TEACHER_NEVER_RUN)
    if needs is not None:
        for need, heads in _TEACHER_RUN_FOR.items():
            if need not in needs:
                prefixes.extend(heads)
    out: Dict[str, list] = {}
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in file_keys):
            continue
        keys = sorted(k for k in own_keys if k.startswith(prefix))
        if keys:
            out[prefix] = keys
    # A prefix inside another one (roi_heads.mask_head. in roi_heads.) is reported once, under the outer one.
    return {p: k for p, k in out.items() if not any(q != p and p.startswith(q) for q in out)}
