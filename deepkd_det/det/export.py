"""The distilled detector leaves the project: a folder a plain detectron2 / torch / onnxruntime
program can use without deepkd_det (docs/deploy.md; command: tools/export_student.py).

``export_detector(cfg, weights, out_dir)`` writes

    model.pth         the student's weights only, detectron2's {"model": state_dict}
                      (no teacher, no ReviewKD head or DiffKD modules, no optimizer or trainer state)
    config.yaml       a config stock detectron2 accepts (``get_cfg().merge_from_file``): the
                      student's meta-architecture GeneralizedRCNN, no project keys
    model.ts          TorchScript (traced ``DetectorForExport``)
    model.onnx        ONNX (opset 17, the same graph)
    mobilenetv2_fpn.py  (MobileNetV2 students) the backbone registration, torch + detectron2 only
    deploy.json       input format, normalisation, size rules, class names, parity figures

and checks itself: the student as the project evaluates it (train_net.py --eval-only), the plain
GeneralizedRCNN built from config.yaml + model.pth, TorchScript and (with onnxruntime) ONNX, on a
sample image and on the same image transposed (another size).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from torch import nn
from torch.nn import functional as F

from deepkd_det.core import deploy as ex
from deepkd_det.core.io import atomic_save, atomic_write, load_weights_only

from . import modeling  # noqa: F401  (registers DeepKDRCNN and the MobileNetV2 backbones)
from .config import WRAPPER_ARCHITECTURES, student_only_cfg
from .data import ALL_SHAPE_CATEGORIES, SHAPES_TRAIN, SHAPES_VAL
from .modeling import mobilenetv2_fpn
from .weights.checkpoint import EvalCheckpointer

__all__ = ["DetectorForExport", "OUTPUT_NAMES", "detectron2_outputs", "export_detector", "preprocess", "stock_config"]

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("boxes", "scores", "classes")
MOBILENETV2_BACKBONES = ("build_mobilenetv2_backbone", "build_mobilenetv2_fpn_backbone")


class DetectorForExport(nn.Module):
    """A GeneralizedRCNN (Faster R-CNN: RPN + standard box head) as tensors in, tensors out, for
    tracing and ONNX.

    Input: one image, ``3 x H x W`` float32 in the model's INPUT.FORMAT channel order, pixel values
    0-255, already resized by the size rule (deploy.json). Normalisation and padding happen inside.
    Output: ``boxes`` (N x 4, x0 y0 x1 y1 in the input image's pixels), ``scores`` (N),
    ``classes`` (N, int64): what ``model.inference(..., do_postprocess=False)`` gives (the export
    checks it is equal), without the rescaling to the original size.

    detectron2's ROI heads split their predictions by the number of proposals of each image, a
    Python int that tracing freezes (another image size, another proposal count: the traced model
    fails). For one image no split is needed, so the box head's inference is called here on the
    whole tensors, with detectron2's own functions (box decoding, fast_rcnn_inference_single_image).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        heads = getattr(model, "roi_heads", None)
        predictor = getattr(heads, "box_predictor", None)
        if getattr(model, "proposal_generator", None) is None or not all(
            hasattr(heads, a) for a in ("box_pooler", "box_head", "box_in_features")
        ) or predictor is None:
            raise ValueError("export: the student must be a two-stage GeneralizedRCNN with a standard box head "
                             f"(MODEL.ROI_HEADS.NAME StandardROIHeads), got {type(heads).__name__}")
        if getattr(predictor, "use_sigmoid_ce", False) or getattr(predictor, "use_fed_loss", False):
            raise ValueError("export: MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS box predictors are not supported")
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        heads, predictor = model.roi_heads, model.roi_heads.box_predictor
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        boxes = [p.proposal_boxes for p in proposals]
        x = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features], boxes))
        logits, deltas = predictor(x)
        decoded = predictor.box2box_transform.apply_deltas(deltas, boxes[0].tensor)
        instances, _ = fast_rcnn_inference_single_image(
            decoded, F.softmax(logits, dim=-1), images.image_sizes[0],
            predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image,
        )
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def detectron2_outputs(model: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    """detectron2's own inference of ``model`` on one resized image: boxes, scores, classes."""
    with torch.no_grad():
        instances = model.inference([{"image": image}], do_postprocess=False)[0]
    return [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]


# ---------------------------------------------------------------- config


def _copy_known(src: CN, dst: CN, prefix: str, dropped: List[str]) -> None:
    for key, value in src.items():
        if key not in dst:
            dropped.append(prefix + key)
        elif isinstance(value, CN) != isinstance(dst[key], CN):
            dropped.append(prefix + key)
        elif isinstance(value, CN):
            _copy_known(value, dst[key], f"{prefix}{key}.", dropped)
        else:
            dst[key] = copy.deepcopy(value)


def stock_config(cfg: CN, weights_name: str = "model.pth") -> Tuple[CN, List[str]]:
    """``(config, dropped keys)``: detectron2's own ``get_cfg()`` with every value of ``cfg`` it
    knows, META_ARCHITECTURE the wrapper's student (KD.STUDENT_ARCHITECTURE) and MODEL.WEIGHTS
    ``weights_name``. A MobileNetV2 student keeps MODEL.MOBILENETV2 only where it differs from the
    defaults the shipped backbone module falls back to (then ``add_mobilenetv2_config`` must run
    before the merge)."""
    out = get_cfg()
    dropped: List[str] = []
    _copy_known(cfg, out, "", dropped)
    if out.MODEL.META_ARCHITECTURE in WRAPPER_ARCHITECTURES:
        out.MODEL.META_ARCHITECTURE = cfg.KD.STUDENT_ARCHITECTURE
    out.MODEL.WEIGHTS = weights_name
    mv2 = cfg.MODEL.get("MOBILENETV2")
    if cfg.MODEL.BACKBONE.NAME in MOBILENETV2_BACKBONES and mv2 is not None:
        if {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in mv2.items()} != mobilenetv2_fpn.MOBILENETV2_DEFAULTS:
            out.MODEL.MOBILENETV2 = copy.deepcopy(mv2)
            dropped.remove("MODEL.MOBILENETV2")
    return out, dropped


# ---------------------------------------------------------------- inputs


def preprocess(cfg: CN, image_bgr: np.ndarray) -> torch.Tensor:
    """What detectron2's DefaultPredictor feeds the model: the HWC uint8 BGR image flipped to
    INPUT.FORMAT, resized (shortest edge MIN_SIZE_TEST, longest at most MAX_SIZE_TEST), as a
    3 x H x W float32 tensor."""
    image = image_bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image_bgr
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))


def _sample_image(cfg: CN, path: Optional[str]) -> Tuple[np.ndarray, str]:
    """HWC uint8 BGR: the ``path`` image, or a generated shapes image (deepkd_det/det/data)."""
    if path:
        from detectron2.data.detection_utils import read_image

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--sample {path!r} does not exist")
        return np.ascontiguousarray(read_image(path, format="BGR")), path
    from .data import render_shapes_image

    size = int(cfg.INPUT.MIN_SIZE_TEST)
    image, _ = render_shapes_image(np.random.default_rng(0), size, num_classes=3)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), f"generated shapes image ({size} px, seed 0)"


def _class_names(cfg: CN) -> Optional[List[str]]:
    """Class names by contiguous index, from the first dataset of DATASETS.TEST / TRAIN whose
    categories are known without reading images (registered metadata, the shapes set, a
    DATASETS.REGISTER json); None when none is."""
    from detectron2.data import MetadataCatalog

    register = {entry[0]: entry[1] for entry in cfg.DATASETS.get("REGISTER", [])}
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names:
            return list(names)
        if name in (SHAPES_TRAIN, SHAPES_VAL):
            count = int(cfg.DATASETS.SHAPES.NUM_CLASSES)
            return [c["name"] for c in ALL_SHAPE_CATEGORIES[:count]]
        if name in register and os.path.isfile(register[name]):
            with open(register[name]) as f:
                categories = json.load(f).get("categories", [])
            return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    return None


# ---------------------------------------------------------------- export


def _student_model(cfg: CN, weights: str) -> nn.Module:
    """The student as ``train_net.py --eval-only`` evaluates it (no teacher, no training-only part)."""
    eval_cfg = student_only_cfg(cfg)
    model = build_model(eval_cfg)
    EvalCheckpointer(model).load(weights)
    return model.eval()


def _outputs(module: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return list(module(image))


def export_detector(
    cfg: CN,
    weights: str,
    out_dir: str,
    formats: Sequence[str] = ("torchscript", "onnx"),
    sample: Optional[str] = None,
) -> Dict:
    """Write the export folder (module docstring) and return deploy.json's content."""
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ValueError("export: MODEL.MASK_ON / MODEL.KEYPOINT_ON students are not supported (boxes only)")
    if "onnx" in formats:
        ex.require_onnx()  # refused before anything is written
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    student = _student_model(cfg, weights)
    state = student.state_dict()  # the student alone: student_only_cfg builds no teacher or training-only part

    plain_cfg, dropped = stock_config(cfg)
    plain = build_model(plain_cfg).eval()
    plain.load_state_dict(state, strict=True)  # every key of the plain detector, nothing else
    wrapper = DetectorForExport(plain).eval()  # (refuses other heads before anything is written)

    os.makedirs(out_dir, exist_ok=True)
    files = {"weights": "model.pth", "config": "config.yaml"}
    atomic_save({"model": state}, os.path.join(out_dir, files["weights"]))
    atomic_write(os.path.join(out_dir, files["config"]), lambda f: f.write(plain_cfg.dump()), mode="w")
    check = get_cfg()  # stock detectron2 accepts the file (a non-default MobileNetV2 after add_mobilenetv2_config)
    if "MOBILENETV2" in plain_cfg.MODEL:
        mobilenetv2_fpn.add_mobilenetv2_config(check)
    check.merge_from_file(os.path.join(out_dir, files["config"]))
    if cfg.MODEL.BACKBONE.NAME in MOBILENETV2_BACKBONES:
        files["backbone_module"] = "mobilenetv2_fpn.py"
        shutil.copyfile(inspect.getsourcefile(mobilenetv2_fpn), os.path.join(out_dir, files["backbone_module"]))

    image_bgr, sample_name = _sample_image(cfg, sample)
    image = preprocess(cfg, image_bgr)
    # Another size: the left 5/8 of the image, so that a traced graph that kept anything of the
    # sample's size (or its proposal count) fails the check.
    other = image[:, :, : max(image.shape[2] * 5 // 8, 8)].contiguous()
    # The reference: detectron2's own inference of the plain detector built from config.yaml + model.pth.
    eager = {"sample": detectron2_outputs(plain, image), "other_size": detectron2_outputs(plain, other)}
    parity: Dict[str, Dict] = {
        "project_eval_vs_plain": ex.largest_difference(detectron2_outputs(student, image), eager["sample"],
                                                       OUTPUT_NAMES),
    }
    for key, x in (("sample", image), ("other_size", other)):
        parity[f"wrapper_{key}"] = ex.largest_difference(eager[key], _outputs(wrapper, x), OUTPUT_NAMES)
    detections = int(eager["sample"][1].numel())

    if "torchscript" in formats:
        files["torchscript"] = "model.ts"
        traced = ex.trace(wrapper, (image,))
        ex.save_torchscript(traced, os.path.join(out_dir, files["torchscript"]))
        loaded = torch.jit.load(os.path.join(out_dir, files["torchscript"]))
        for key, x in (("sample", image), ("other_size", other)):
            parity[f"torchscript_{key}"] = ex.largest_difference(eager[key], _outputs(loaded, x), OUTPUT_NAMES)
    onnx_note = None
    if "onnx" in formats:
        files["onnx"] = "model.onnx"
        path = os.path.join(out_dir, files["onnx"])
        ex.export_onnx(wrapper, (image,), path, ["image"], list(OUTPUT_NAMES),
                       {"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                        "scores": {0: "detections"}, "classes": {0: "detections"}})
        for key, x in (("sample", image), ("other_size", other)):
            got = ex.run_onnx(path, (x,))
            if got is None:
                onnx_note = "onnxruntime is not installed: the ONNX file was not checked (" + ex.EXPORT_EXTRA + ")"
                break
            parity[f"onnx_{key}"] = ex.largest_difference(eager[key], got, OUTPUT_NAMES)

    backbone = plain.backbone
    info = {
        "task": "detection",
        "framework": "detectron2",
        "meta_architecture": "GeneralizedRCNN",
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "files": files,
        "sizes_mb": {**{k: ex.file_megabytes(os.path.join(out_dir, v)) for k, v in files.items()},
                     "source_checkpoint": ex.file_megabytes(weights)},
        "source": {"weights": os.path.abspath(weights), "dropped_config_keys": dropped,
                   "left_behind": _left_behind(weights, state)},
        "input": {
            "format": cfg.INPUT.FORMAT,
            "channel_order": list(cfg.INPUT.FORMAT),
            "tensor": "3 x H x W float32, pixel values 0-255 (not normalised), one image",
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "normalisation": "inside the model: (x - pixel_mean) / pixel_std per channel",
            "resize": {"shortest_edge": int(cfg.INPUT.MIN_SIZE_TEST), "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
                       "rule": "scale = shortest_edge / min(h, w), reduced so that max(h, w) * scale <= max_size; "
                               "bilinear; detectron2 ResizeShortestEdge"},
            "size_divisibility": int(backbone.size_divisibility),
            "padding": "inside the model (zeros after normalisation, to a multiple of size_divisibility)",
        },
        "outputs": {
            "boxes": "N x 4 float32, x0 y0 x1 y1 in the pixels of the resized input; divide by the resize scale "
                     "for the original image",
            "scores": "N float32, sorted by detectron2's per-class NMS order (not globally sorted)",
            "classes": "N int64, index into class_names",
            "score_threshold": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
            "nms_threshold": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
            "max_detections": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        },
        "class_names": _class_names(cfg),
        "parity": {
            "sample": sample_name,
            "input_size": list(image.shape[1:]),
            "other_size": list(other.shape[1:]),
            "detections": detections,
            "measure": "per output: abs = max |a - b|, rel = abs / max(1, max |a|); inf = another detection count",
            "figures": parity,
            "onnx_note": onnx_note,
        },
        "onnx_opset": ex.ONNX_OPSET if "onnx" in formats else None,
        "versions": _versions(),
    }
    return info


def _left_behind(weights: str, state: Dict) -> Dict[str, List[str]]:
    """What the checkpoint held beyond the student: model-key prefixes (teacher, ReviewKD head,
    DiffKD modules) and other entries (optimizer and trainer state, schedules)."""
    if weights.endswith((".pkl", ".pyth")):
        return {}
    loaded = load_weights_only(weights)
    if not isinstance(loaded, dict):
        return {}
    model = loaded.get("model", loaded)
    prefixes = sorted({k.split(".")[0] for k in model if k not in state})
    return {"model_parts": prefixes, "entries": sorted(k for k in loaded if k != "model")}


def _versions() -> Dict[str, Optional[str]]:
    import detectron2
    import torchvision

    from .engine.trainer import uses_fast_coco_eval

    out = {"torch": torch.__version__, "torchvision": torchvision.__version__, "detectron2": detectron2.__version__,
           # main and v0.6 both say 0.6: the compiled ops tell a source build from the pure-Python route
           "detectron2_compiled_ops": uses_fast_coco_eval()}
    for name in ("onnx", "onnxruntime"):
        mod = ex.onnxruntime_or_none() if name == "onnxruntime" else _optional("onnx")
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    return out


def _optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None
