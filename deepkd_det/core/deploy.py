"""What both exporters share (pure torch; onnx and onnxruntime are optional): TorchScript by
tracing, ONNX by torch's TorchScript-based exporter, the parity measure, and the files.

Used by ``deepkd_det/det/export.py`` and ``deepkd_det/cls/export.py`` through
``tools/export_student.py``; docs/deploy.md describes the folder they write.

- TorchScript: ``torch.jit.trace`` of a module that takes tensors and returns a tuple of tensors.
- ONNX: ``torch.onnx.export(..., dynamo=False)`` at opset ``ONNX_OPSET``. The dynamo exporter
  fails on detectron2's detectors (data-dependent control flow) and leaves a 0-byte file; the
  TorchScript-based one gives RoIAlign within 1.3e-7 at opset 16-17 (0.01 off at opset 11, whose
  RoiAlign has no half-pixel mode). Both files are written to memory first and renamed into place,
  so a failed export never leaves a partial file.
- Parity: for each output, the largest absolute difference and that difference relative to the
  output's scale, ``max|a - b| / max(1, max|a|)`` (box coordinates are pixels, scores and logits
  near 1); outputs of different shapes (another detection count) are an infinite difference.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from .io import atomic_write, atomic_write_json

__all__ = [
    "EXPORT_EXTRA",
    "ExportExtraMissing",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "TORCHSCRIPT_TOLERANCE",
    "export_onnx",
    "file_megabytes",
    "largest_difference",
    "onnxruntime_or_none",
    "parity_failures",
    "require_onnx",
    "run_onnx",
    "save_torchscript",
    "trace",
    "worst",
    "write_json",
]

ONNX_OPSET = 17
EXPORT_EXTRA = "pip install -e '.[export]'"
# Largest relative difference accepted (see the module docstring for the measure).
TORCHSCRIPT_TOLERANCE = 1e-6
ONNX_TOLERANCE = 1e-4


class ExportExtraMissing(ImportError):
    """onnx is needed for the ONNX file and is not installed (the optional ``[export]`` extra)."""


def require_onnx():
    """The ``onnx`` module, or ExportExtraMissing with the one line that says what to do."""
    try:
        return importlib.import_module("onnx")
    except ImportError:
        raise ExportExtraMissing(
            f"the ONNX export needs onnx (and onnxruntime for its check), the optional extra: {EXPORT_EXTRA}; "
            "or leave ONNX out with --formats torchscript"
        ) from None


def onnxruntime_or_none():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        return None


def trace(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``module`` (in eval mode, no gradient); parity is checked by the caller."""
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # detectron2's shape checks become constants in the trace; parity is measured instead.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, tuple(inputs), check_trace=False)


def save_torchscript(traced: torch.jit.ScriptModule, path: str) -> None:
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def export_onnx(
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    path: str,
    input_names: List[str],
    output_names: List[str],
    dynamic_axes: Dict[str, Dict[int, str]],
    opset: int = ONNX_OPSET,
) -> None:
    """``module`` as an ONNX file (TorchScript-based exporter, ``opset``), checked by onnx.checker."""
    onnx = require_onnx()
    module.eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)  # the legacy exporter's notes on constants
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, tuple(inputs), buf, opset_version=opset, dynamo=False,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write(path, lambda f: f.write(data))


def run_onnx(path: str, inputs: Sequence[torch.Tensor]) -> Optional[List[torch.Tensor]]:
    """The outputs of the ONNX file in onnxruntime (CPU), or None when onnxruntime is absent."""
    ort = onnxruntime_or_none()
    if ort is None:
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feed)]


def largest_difference(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor],
                       names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """``{name: {"abs": max|a - b|, "rel": abs / max(1, max|a|)}}``; different shapes: inf."""
    out = {}
    for name, a, b in zip(names, reference, other):
        a, b = a.detach().cpu(), torch.as_tensor(b).detach().cpu()
        if a.shape != b.shape:
            out[name] = {"abs": math.inf, "rel": math.inf, "shapes": [list(a.shape), list(b.shape)]}
            continue
        if a.numel() == 0:
            out[name] = {"abs": 0.0, "rel": 0.0}
            continue
        diff = (a.double() - b.double()).abs().max().item()
        scale = max(1.0, a.double().abs().max().item())
        out[name] = {"abs": diff, "rel": diff / scale}
    return out


def worst(figures: Dict[str, Dict[str, float]]) -> float:
    """The largest relative difference of ``figures`` (largest_difference's)."""
    return max((f["rel"] for f in figures.values()), default=0.0)


def file_megabytes(path: str) -> float:
    return round(os.path.getsize(path) / 1e6, 3)


def write_json(path: str, data) -> None:
    atomic_write_json(path, _finite(data))


def _finite(obj):
    """JSON has no infinity: inf becomes the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def parity_failures(figures: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
    """The checks of ``figures`` ({check: largest_difference}) past their tolerance: "equal" checks
    (TorchScript, the project's evaluation model vs the plain one) at TORCHSCRIPT_TOLERANCE, ONNX
    and GPD's shared-vs-exported student at ONNX_TOLERANCE."""
    out = []
    for check, fig in figures.items():
        tol = ONNX_TOLERANCE if check.startswith(("onnx", "gpd")) else TORCHSCRIPT_TOLERANCE
        rel = worst(fig)
        if not rel <= tol:
            out.append(f"{check} {rel:.3g} > {tol:g}")
    return out
