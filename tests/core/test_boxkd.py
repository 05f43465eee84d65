"""Box-regression KD (deepkd_det/core/boxkd.py) against a row-by-row computation."""

from __future__ import annotations

import pytest
import torch

from deepkd_det.core.boxkd import box_regression_kd_loss


def _by_hand(s, t, labels, k):
    rows = []
    for i, y in enumerate(labels.tolist()):
        if 0 <= y < k:
            cols = slice(0, 4) if s.shape[1] == 4 else slice(4 * y, 4 * y + 4)
            rows.append(((s[i, cols] - t[i, cols]) ** 2).sum())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("agnostic", [False, True])
def test_matches_the_row_by_row_formula_and_only_student_gets_gradient(agnostic):
    g = torch.Generator().manual_seed(0)
    k = 3
    cols = 4 if agnostic else 4 * k
    s = torch.randn(6, cols, generator=g, requires_grad=True)
    t = torch.randn(6, cols, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, 2, 1, 3, 2])  # 3 = background: left out
    loss = box_regression_kd_loss(s, t, labels, k)
    assert torch.allclose(loss, _by_hand(s.detach(), t.detach(), labels, k))
    loss.backward()
    assert t.grad is None
    assert torch.all(s.grad[labels == k] == 0) and s.grad[labels < k].abs().sum() > 0
    if not agnostic:  # only the ground-truth class's 4 deltas are compared
        assert torch.all(s.grad[0, 4:] == 0) and s.grad[0, :4].abs().sum() > 0


def test_no_foreground_gives_a_connected_zero_and_bad_shapes_are_named():
    s = torch.randn(2, 12, requires_grad=True)
    loss = box_regression_kd_loss(s, torch.randn(2, 12), torch.tensor([3, 3]), 3)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="differ"):
        box_regression_kd_loss(s, torch.randn(2, 8), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="columns"):
        box_regression_kd_loss(torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0, 1]), 3)
