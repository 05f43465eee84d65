"""ReviewKD for detection (core.reviewkd): HCL on hand-made tensors, ABF and the review head."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepkd_det.core.reviewkd import ABF, REVIEWKD_DET_FEATURES, ReviewKDHead, hcl_loss


def _avg_pool_ref(x, size):
    """Adaptive average pooling by loops: bin i covers [floor(i H / l), ceil((i + 1) H / l))."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, size, size, dtype=x.dtype)
    for i in range(size):
        r0, r1 = (i * h) // size, math.ceil((i + 1) * h / size)
        for j in range(size):
            c0, c1 = (j * w) // size, math.ceil((j + 1) * w / size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def _hcl_ref(fs_list, ft_list):
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        h = fs.shape[2]
        terms = [(1.0, ((fs - ft) ** 2).mean().item())]
        for size in (4, 2, 1):
            if size < h:
                weight = 0.5 ** len(terms)  # 1/2, 1/4, 1/8 in order of use
                terms.append((weight, ((_avg_pool_ref(fs, size) - _avg_pool_ref(ft, size)) ** 2).mean().item()))
        total += sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    return total


def test_hcl_on_hand_made_maps():
    # 4x4 checkerboard of +-1 against zeros: full-resolution MSE 1; every 2x2 and the 1x1 average is 0;
    # the 4x4 level is skipped (4 >= H). HCL = (1 + 0/2 + 0/4) / (1 + 1/2 + 1/4) = 1 / 1.75.
    board = torch.tensor([[(-1.0) ** (i + j) for j in range(4)] for i in range(4)])[None, None]
    assert hcl_loss([torch.zeros_like(board)], [board]).item() == pytest.approx(1 / 1.75, abs=1e-7)
    # 8x8, +1 on the left half and -1 on the right: MSE 1 at full size, at 4x4 and at 2x2; 0 at 1x1.
    # HCL = (1 + 1/2 + 1/4 + 0/8) / (1 + 1/2 + 1/4 + 1/8) = 1.75 / 1.875.
    halves = torch.ones(1, 1, 8, 8)
    halves[..., 4:] = -1
    assert hcl_loss([torch.zeros_like(halves)], [halves]).item() == pytest.approx(1.75 / 1.875, abs=1e-7)
    # Levels add up; a 1x1 map has no pyramid (plain MSE).
    dot = torch.full((1, 1, 1, 1), 3.0)
    total = hcl_loss([torch.zeros_like(board), torch.zeros_like(halves), torch.zeros_like(dot)], [board, halves, dot])
    assert total.item() == pytest.approx(1 / 1.75 + 1.75 / 1.875 + 9.0, abs=1e-6)
    assert hcl_loss([halves], [halves]).item() == 0.0


def test_hcl_matches_loop_reference_on_fpn_like_sizes():
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 20), (8, 10), (5, 5), (3, 3), (2, 2)]  # non-divisible and tiny levels included
    fs = [torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    ft = [torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    assert hcl_loss(fs, ft).item() == pytest.approx(_hcl_ref(fs, ft), abs=1e-12)


def test_hcl_gradient_goes_to_student_only():
    fs = torch.randn(1, 2, 6, 6, requires_grad=True)
    ft = torch.randn(1, 2, 6, 6, requires_grad=True)
    hcl_loss([fs], [ft]).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0 and ft.grad is None


def test_abf_shapes_and_gradients():
    torch.manual_seed(0)
    fuse = ABF(in_channels=5, mid_channels=6, out_channels=7, fuse=True)
    top = ABF(in_channels=3, mid_channels=6, out_channels=7, fuse=False)
    x_top = torch.randn(2, 3, 4, 5, requires_grad=True)
    x = torch.randn(2, 5, 7, 9, requires_grad=True)
    out_top, res = top(x_top)
    assert out_top.shape == (2, 7, 4, 5) and res.shape == (2, 6, 4, 5)
    out, fused = fuse(x, res)  # the coarser 4x5 map is upsampled to 7x9
    assert out.shape == (2, 7, 7, 9) and fused.shape == (2, 6, 7, 9)
    (out.square().mean() + out_top.mean()).backward()
    for module in (fuse, top):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and x_top.grad.abs().sum() > 0  # the review path reaches the coarse input


def test_abf_fusion_formula():
    torch.manual_seed(1)
    abf = ABF(4, 3, 2, fuse=True, norm="none")
    x, r = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 2, 2)
    _, fused = abf(x, r)
    f = F.conv2d(x, abf.lateral[0].weight)
    up = r.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest upsampling 2x2 -> 4x4
    att = torch.sigmoid(F.conv2d(torch.cat([f, up], 1), abf.attention[0].weight, abf.attention[0].bias))
    assert torch.allclose(fused, f * att[:, :1] + up * att[:, 1:], atol=1e-6)


def _pyramid(channels, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes)]


SIZES = [(20, 24), (10, 12), (5, 6), (3, 3), (2, 2)]  # p2..p6 of a 80x96 input (p6 = maxpool of p5)


def test_head_maps_finest_first_and_reviews_coarse_to_fine():
    torch.manual_seed(0)
    head = ReviewKDHead([8, 8, 8, 8, 8], out_channels=6, mid_channels=4).eval()
    feats = _pyramid([8] * 5, SIZES)
    outs = head(feats)
    assert len(REVIEWKD_DET_FEATURES) == 5
    assert [tuple(o.shape) for o in outs] == [(2, 6, h, w) for h, w in SIZES]
    # The coarsest output sees only the coarsest input; the finest sees every coarser level.
    changed = [f.clone() for f in feats]
    changed[0] += 1.0
    assert torch.equal(head(changed)[-1], outs[-1]) and not torch.allclose(head(changed)[0], outs[0])
    changed = [f.clone() for f in feats]
    changed[-1] += 1.0
    assert not torch.allclose(head(changed)[0], outs[0])


def test_head_per_level_channels_and_training_reduces_hcl():
    torch.manual_seed(0)
    head = ReviewKDHead([4, 6, 8, 8, 8], out_channels=[5, 5, 5, 5, 5], mid_channels=8)
    feats = _pyramid([4, 6, 8, 8, 8], SIZES, seed=1)
    teacher = _pyramid([5] * 5, SIZES, seed=2)
    losses = []
    for _ in range(10):  # plain gradient descent (torch.optim would import torch._dynamo: seconds)
        loss = hcl_loss(head(feats), teacher)
        head.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= 0.1 * p.grad
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_input_is_refused():
    head = ReviewKDHead([8, 8], out_channels=8, mid_channels=4)
    with pytest.raises(ValueError, match="feature levels"):
        head([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="entries"):
        ReviewKDHead([8, 8], out_channels=[8])
    with pytest.raises(ValueError, match="residual"):
        ABF(4, 4, 4, fuse=True)(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="same"):
        hcl_loss([torch.randn(1, 2, 4, 4)], [torch.randn(1, 2, 4, 5)])
    with pytest.raises(ValueError, match="number"):
        hcl_loss([torch.randn(1, 2, 4, 4)], [])
