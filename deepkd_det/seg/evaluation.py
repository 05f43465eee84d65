"""mIoU as detectron2's ``SemSegEvaluator`` defines it, on a confusion matrix over valid pixels.

``conf[g, p]`` counts the pixels of ground-truth class g predicted as p (pixels labelled 255 are
left out). Per class: ``IoU = tp / (tp + fp + fn)``. detectron2 changed which classes the mean
runs over after v0.6, so both are offered (``TEST.MIOU_CLASSES``):

- ``"union"`` (detectron2 v0.6, and mmsegmentation's nan-mean): the IoU of the classes in the
  ground truth, summed, over the number of classes in the ground truth *or* the predictions (a
  class that is only predicted counts as 0);
- ``"gt"`` (detectron2 main): the mean IoU of the classes that occur in the ground truth.

They agree whenever no class is predicted that the ground truth lacks (on Cityscapes val every
class occurs). mACC (mean over ground-truth classes) and pACC are the same in both; percent.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

__all__ = ["MIOU_CLASSES", "ConfusionMatrix", "miou_from_confusion"]


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """``pred``, ``label``: integer maps of one shape (any batch layout)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != self.ignore_index
        idx = label[valid].long().cpu() * self.num_classes + pred[valid].long().cpu()
        self.matrix += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def compute(self, class_names: Sequence[str] = (), classes: str = "union") -> Dict[str, float]:
        return miou_from_confusion(self.matrix.numpy(), class_names, classes)


MIOU_CLASSES = ("union", "gt")


def miou_from_confusion(conf: np.ndarray, class_names: Sequence[str] = (), classes: str = "union") -> Dict[str, float]:
    if classes not in MIOU_CLASSES:
        raise ValueError(f"TEST.MIOU_CLASSES must be one of {MIOU_CLASSES}, got {classes!r}")
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    pos_gt, pos_pred = conf.sum(axis=1), conf.sum(axis=0)
    union = pos_gt + pos_pred - tp
    in_gt, in_either = pos_gt > 0, (pos_gt + pos_pred) > 0
    iou = np.full(len(tp), np.nan)
    iou[in_gt] = tp[in_gt] / union[in_gt]
    acc = np.full(len(tp), np.nan)
    acc[in_gt] = tp[in_gt] / pos_gt[in_gt]
    total = conf.sum()
    out = {
        "mIoU": 100.0 * float(np.sum(iou[in_gt]) / max(np.sum(in_either if classes == "union" else in_gt), 1)),
        "mACC": 100.0 * float(np.sum(acc[in_gt]) / max(np.sum(in_gt), 1)),
        "pACC": 100.0 * float(tp.sum() / total) if total else 0.0,
    }
    names = list(class_names) or [str(i) for i in range(len(tp))]
    for name, v in zip(names, iou):
        out[f"IoU-{name}"] = 100.0 * float(v) if not np.isnan(v) else float("nan")
    return out
