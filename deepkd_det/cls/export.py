"""The distilled classifier leaves the project (docs/deploy.md; command: tools/export_student.py).

``export_classifier(cfg, weights, out_dir)`` writes

    model.pth        the plain student's state dict (``model.load_state_dict(torch.load(...))``);
                     a GPD shared model is exported to the ordinary student first (core.gpd.export)
    <family>.py      the single-file model definition (torch only) for the CIFAR families, which are
                     this project's classes; ImageNet students are torchvision's ResNet / MobileNetV2
                     (deploy.json names the torchvision constructor; the file is shipped too)
    model.ts         TorchScript (traced)
    model.onnx       ONNX (opset 17, dynamic batch)
    deploy.json      architecture, input size and normalisation, class names, parity figures

and checks itself: the student as tools/eval_cls.py evaluates it, the plain model loaded from
model.pth, TorchScript and (with onnxruntime) ONNX, on validation images (random ones where the
dataset is absent).
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from deepkd_det.core import deploy as ex
from deepkd_det.core.gpd import STUDENT, at_width
from deepkd_det.core.io import atomic_save

from .data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetMissingError,
    build_datasets,
)
from .distillers.gpd import plain_student, widen_student
from .models import MODEL_REGISTRY, build_model, load_teacher_weights, read_state_dict

__all__ = ["TORCHVISION_CONSTRUCTORS", "export_classifier"]

OUTPUT_NAMES = ("logits",)
# ImageNet students are torchvision's classes (models/imagenet.py): the same state dict.
TORCHVISION_CONSTRUCTORS = {
    "imagenet_resnet18": "torchvision.models.resnet18",
    "imagenet_resnet34": "torchvision.models.resnet34",
    "imagenet_resnet50": "torchvision.models.resnet50",
    "imagenet_mobilenet_v2": "torchvision.models.mobilenet_v2",
}
_SAMPLES = 4


def _dataset(cfg) -> Tuple[Optional[object], Optional[object], Optional[str]]:
    """``(train set, validation set, None)`` or ``(None, None, why)`` where the files are absent."""
    try:
        train, val, _ = build_datasets(cfg)
        return train, val, None
    except DatasetMissingError as exc:
        return None, None, str(exc)


def _input_description(cfg, train) -> Dict:
    kind = cfg.DATASET.TYPE
    if kind == "digits":
        size = int(cfg.DATASET.DIGITS.SIZE)
        mean, std = float(train.mean), float(train.std)
        return {"tensor": f"N x 3 x {size} x {size} float32, normalised", "size": [size, size],
                "pixel_range": "[0, 1]: scikit-learn's 8x8 digit values / 16, bilinear-upsampled to "
                               f"{size} x {size}, the same values in all 3 channels",
                "mean": [mean] * 3, "std": [std] * 3, "channel_order": "any (grey)",
                "normalisation": "outside the model: (x - mean) / std"}
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if kind == "cifar100" else (IMAGENET_MEAN, IMAGENET_STD)
    size = 32 if kind == "cifar100" else 224
    resize = "none (32 x 32 images)" if kind == "cifar100" else "shorter side to 256 (bilinear), centre crop 224"
    return {"tensor": f"N x 3 x {size} x {size} float32, normalised", "size": [size, size],
            "pixel_range": "[0, 1] (uint8 / 255)", "resize": resize, "mean": list(mean), "std": list(std),
            "channel_order": "RGB", "normalisation": "outside the model: (x - mean) / std per channel"}


def _sample(cfg, val, size: List[int]) -> Tuple[torch.Tensor, str]:
    if val is not None and len(val) > 0:
        items = [val[i][0] for i in range(min(_SAMPLES, len(val)))]
        return torch.stack(items), f"the first {len(items)} validation images"
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *size, generator=gen), "2 random normal images (seed 0; the dataset is absent)"


def _standalone(path: str) -> bool:
    """Whether the file imports nothing but torch / torchvision / the standard library."""
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if isinstance(node, ast.ImportFrom) and node.level:
            return False
        if any(n.split(".")[0] == "deepkd_det" for n in names):
            return False
    return True


def _project_student(cfg, weights: str, num_classes: int) -> Tuple[nn.Module, Dict]:
    """The student as tools/eval_cls.py evaluates it, and extra parity figures (GPD)."""
    name = cfg.DISTILLER.STUDENT
    extra: Dict = {}
    if cfg.GPD.ENABLED:
        shared = widen_student(cfg, build_model(name, num_classes), check=False)
        if set(read_state_dict(weights)) == set(shared.state_dict()):
            shared.load_state_dict(read_state_dict(weights))  # strict
            shared.eval()
            extra["gpd_shared"] = shared
            return plain_student(shared).eval(), extra
    return load_teacher_weights(build_model(name, num_classes), weights).eval(), extra


def export_classifier(cfg, weights: str, out_dir: str, formats: Sequence[str] = ("torchscript", "onnx")) -> Dict:
    """Write the export folder (module docstring) and return deploy.json's content."""
    if "onnx" in formats:
        ex.require_onnx()  # refused before anything is written
    name = cfg.DISTILLER.STUDENT
    train, val, missing = _dataset(cfg)
    num_classes = len(val.classes) if val is not None and hasattr(val, "classes") else None
    if num_classes is None:
        from .config import NUM_CLASSES

        num_classes = NUM_CLASSES[cfg.DATASET.TYPE]
    student, extra = _project_student(cfg, weights, num_classes)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    plain = build_model(name, num_classes).eval()
    plain.load_state_dict(state, strict=True)

    os.makedirs(out_dir, exist_ok=True)
    files = {"weights": "model.pth"}
    atomic_save(state, os.path.join(out_dir, files["weights"]))
    constructor = MODEL_REGISTRY[name]
    source = inspect.getsourcefile(constructor)
    if _standalone(source):
        files["model_definition"] = os.path.basename(source)
        shutil.copyfile(source, os.path.join(out_dir, files["model_definition"]))

    description = _input_description(cfg, train)
    images, sample_name = _sample(cfg, val, description["size"])
    with torch.no_grad():
        eager = [plain(images)]
        eager_one = [plain(images[:1])]  # (a batch of one runs other kernels than a batch of 16)
        parity: Dict[str, Dict] = {
            "project_eval_vs_plain": ex.largest_difference([student(images)], eager, OUTPUT_NAMES)}
        if "gpd_shared" in extra:
            with at_width(extra["gpd_shared"], STUDENT):
                parity["gpd_shared_vs_exported"] = ex.largest_difference(
                    [extra["gpd_shared"](images)], eager, OUTPUT_NAMES)
    if "torchscript" in formats:
        files["torchscript"] = "model.ts"
        ex.save_torchscript(ex.trace(plain, (images,)), os.path.join(out_dir, files["torchscript"]))
        loaded = torch.jit.load(os.path.join(out_dir, files["torchscript"]))
        with torch.no_grad():
            parity["torchscript_sample"] = ex.largest_difference(eager, [loaded(images)], OUTPUT_NAMES)
            parity["torchscript_one_image"] = ex.largest_difference(eager_one, [loaded(images[:1])], OUTPUT_NAMES)
    onnx_note = None
    if "onnx" in formats:
        files["onnx"] = "model.onnx"
        path = os.path.join(out_dir, files["onnx"])
        ex.export_onnx(plain, (images,), path, ["image"], list(OUTPUT_NAMES), {"image": {0: "batch"}, "logits": {0: "batch"}})
        got = ex.run_onnx(path, (images,))
        if got is None:
            onnx_note = "onnxruntime is not installed: the ONNX file was not checked (" + ex.EXPORT_EXTRA + ")"
        else:
            parity["onnx_sample"] = ex.largest_difference(eager, got, OUTPUT_NAMES)
            one = ex.run_onnx(path, (images[:1],))
            parity["onnx_one_image"] = ex.largest_difference(eager_one, one, OUTPUT_NAMES)

    class_names = list(val.classes) if val is not None and hasattr(val, "classes") else None
    definition = {"python_file": files.get("model_definition"), "constructor": constructor.__name__,
                  "call": f"{constructor.__name__}({num_classes})"}
    if name in TORCHVISION_CONSTRUCTORS:
        definition["torchvision"] = f"{TORCHVISION_CONSTRUCTORS[name]}(num_classes={num_classes})"
    return {
        "task": "classification",
        "framework": "torch",
        "architecture": name,
        "num_classes": num_classes,
        "model_definition": definition,
        "files": files,
        "sizes_mb": {**{k: ex.file_megabytes(os.path.join(out_dir, v)) for k, v in files.items()},
                     "source_checkpoint": ex.file_megabytes(weights)},
        "source": {"weights": os.path.abspath(weights), "gpd_export": "gpd_shared" in extra,
                   "dataset_note": missing},
        "input": {**description, "layout": "NCHW"},
        "outputs": {"logits": f"N x {num_classes} float32 (softmax for probabilities)"},
        "class_names": class_names,
        "parity": {
            "sample": sample_name,
            "measure": "per output: abs = max |a - b|, rel = abs / max(1, max |a|)",
            "figures": parity,
            "onnx_note": onnx_note,
        },
        "onnx_opset": ex.ONNX_OPSET if "onnx" in formats else None,
        "versions": {"torch": torch.__version__, **_optional_versions()},
    }


def _optional_versions() -> Dict[str, Optional[str]]:
    out = {}
    for mod in ("onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out
