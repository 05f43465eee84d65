"""What the dense-head parts share: the student's and the teacher's outputs flattened over the
same anchors, and the anchors' labels (RetinaNet-like heads: per level N x (A*K) x H x W class
logits and N x (A*4) x H x W box deltas)."""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["flatten_levels", "anchor_labels"]


def flatten_levels(outputs: List[torch.Tensor], channels: int) -> torch.Tensor:
    """Per-level ``N x (A*C) x H x W`` maps -> ``(N * sum_l H_l W_l A, C)``, rows ordered as
    detectron2 orders its anchors (image, level, position, anchor)."""
    rows = []
    for x in outputs:
        n, _, h, w = x.shape
        rows.append(x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(rows, dim=1).reshape(-1, channels)


@torch.no_grad()
def anchor_labels(student, class_maps: List[torch.Tensor], batched_inputs) -> Tuple[torch.Tensor, int]:
    """The student's own anchor labels for this batch, flattened like ``flatten_levels``: -1 ignored,
    ``0..K-1`` the matched ground-truth class, ``K`` background; and the number of positives.
    Recomputed with the student's anchor generator and matcher (deterministic, no gradient)."""
    anchors = student.anchor_generator(class_maps)  # only the maps' sizes and device are read
    device = class_maps[0].device
    gt = [x["instances"].to(device) for x in batched_inputs]
    labels, _ = student.label_anchors(anchors, gt)
    labels = torch.stack(labels).reshape(-1)
    k = int(student.num_classes)
    return labels, int(((labels >= 0) & (labels < k)).sum())
