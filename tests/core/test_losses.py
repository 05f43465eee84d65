"""The decoupled KD losses against independent computations (docs/maths.md)."""

import pytest
import torch
import torch.nn.functional as F

from deepkd_det.core.losses import (
    dkd_components,
    kd_components,
    kd_loss,
    kd_parts,
    standardize_logits,
    topk_nontarget_mask,
    warmup_factor,
)


def _logits(n, c, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, c, generator=g, dtype=dtype) * scale
    zt = torch.randn(n, c, generator=g, dtype=dtype) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return zs, zt, y


def _naive_kl(p, q):
    """sum_j p_j log(p_j / q_j) with 0 log 0 = 0, straight from the definition."""
    terms = [a * torch.log(a / b) for a, b in zip(p.unbind(-1), q.unbind(-1))]
    return sum(torch.where(a > 0, t, torch.zeros_like(t)) for a, t in zip(p.unbind(-1), terms))


def _naive_parts(zs, zt, y, T, keep=None):
    """TCKD_i and NCKD_i (times T^2) by explicit per-row loops over probabilities."""
    ps, pt = F.softmax(zs / T, 1), F.softmax(zt / T, 1)
    tckd, nckd = [], []
    for i in range(zs.shape[0]):
        yi = int(y[i])
        bs = torch.stack([ps[i, yi], 1 - ps[i, yi]])[None]
        bt = torch.stack([pt[i, yi], 1 - pt[i, yi]])[None]
        tckd.append(_naive_kl(bt, bs)[0])
        idx = [j for j in range(zs.shape[1]) if j != yi and (keep is None or keep[i, j])]
        qs = ps[i, idx] / ps[i, idx].sum()
        qt = pt[i, idx] / pt[i, idx].sum()
        nckd.append(_naive_kl(qt[None], qs[None])[0])
    return torch.stack(tckd) * T**2, torch.stack(nckd) * T**2


@pytest.mark.parametrize("c,T", [(2, 1.0), (10, 1.0), (81, 1.0), (100, 4.0), (1000, 2.0)])
def test_decomposition_identity_per_row(c, T):
    zs, zt, y = _logits(32, c, seed=c)
    if c == 81:  # detection: background is the last class and is a common target
        y[::2] = c - 1
    parts = kd_parts(zs, zt, y, temperature=T, reduction="none")
    kd = kd_loss(zs, zt, temperature=T, reduction="none")
    lhs = parts.tckd + (1 - parts.teacher_target_prob) * parts.nckd
    assert parts.tckd.shape == (32,) and parts.nckd.shape == (32,)
    assert torch.allclose(lhs, kd, atol=1e-5, rtol=0)


def test_decomposition_identity_float32_inputs():
    zs, zt, y = _logits(64, 81, seed=3, dtype=torch.float32)
    y[:20] = 80
    parts = kd_parts(zs, zt, y, temperature=1.0, reduction="none")
    lhs = parts.tckd + (1 - parts.teacher_target_prob) * parts.nckd
    assert torch.allclose(lhs, kd_loss(zs, zt, reduction="none"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_parts_match_naive_loops(T):
    zs, zt, y = _logits(8, 7, seed=11)
    parts = kd_parts(zs, zt, y, temperature=T, reduction="none")
    tckd, nckd = _naive_parts(zs, zt, y, T)
    assert torch.allclose(parts.tckd, tckd, atol=1e-10)
    assert torch.allclose(parts.nckd, nckd, atol=1e-10)
    assert torch.allclose(parts.teacher_target_prob, F.softmax(zt / T, 1).gather(1, y[:, None]).squeeze(1))


def test_dkd_equals_straightforward_computation():
    zs, zt, y = _logits(16, 10, seed=5)
    alpha, beta, T, w = 1.0, 8.0, 4.0, 0.35
    tcg, ncg = dkd_components(zs, zt, y, alpha=alpha, beta=beta, temperature=T, warmup=w)
    tckd, nckd = _naive_parts(zs, zt, y, T)
    assert torch.allclose(tcg, w * alpha * tckd.mean(), atol=1e-10)
    assert torch.allclose(ncg, w * beta * nckd.mean(), atol=1e-10)


def test_kd_components_sum_to_kd_and_batch_coupling():
    zs, zt, y = _logits(16, 20, seed=9)
    tcg, ncg = kd_components(zs, zt, y, temperature=4.0)
    assert torch.allclose(tcg + ncg, kd_loss(zs, zt, temperature=4.0), atol=1e-10)
    # The reference code's batch coupling: mean(1 - p_t[y]) * mean(NCKD).
    tcg_b, ncg_b = kd_components(zs, zt, y, temperature=4.0, coupling="batch")
    parts = kd_parts(zs, zt, y, temperature=4.0, reduction="none")
    assert torch.allclose(tcg_b, tcg)
    assert torch.allclose(ncg_b, (1 - parts.teacher_target_prob).mean() * parts.nckd.mean())
    assert not torch.allclose(ncg_b, ncg)


def test_topk_all_classes_equals_unmasked():
    zs, zt, y = _logits(16, 12, seed=1)
    full = kd_parts(zs, zt, y, temperature=2.0, reduction="none")
    for k in (11, 50, torch.full((16,), 11)):
        masked = kd_parts(zs, zt, y, temperature=2.0, topk=k, reduction="none")
        assert torch.equal(masked.nckd, full.nckd)
        assert torch.equal(masked.tckd, full.tckd)


def test_topk_mask_keeps_teacher_top_nontarget_and_never_target():
    zs, zt, y = _logits(64, 15, seed=2)
    for k in (1, 3, 14):
        mask = topk_nontarget_mask(zt, y, k)
        assert not mask.gather(1, y[:, None]).any(), "the target class is never part of NCKD"
        assert (mask.sum(1) == k).all()
        for i in range(64):
            others = [j for j in range(15) if j != int(y[i])]
            expected = set(sorted(others, key=lambda j: -float(zt[i, j]))[:k])
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected


def test_topk_mask_is_shared_by_teacher_and_student_and_matches_naive():
    zs, zt, y = _logits(12, 9, seed=4)
    k = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4])
    mask = topk_nontarget_mask(zt, y, k)
    assert (mask.sum(1) == k).all()
    parts = kd_parts(zs, zt, y, temperature=1.5, topk=k, reduction="none")
    # Independent computation with the same kept classes for teacher and student.
    tckd, nckd = _naive_parts(zs, zt, y, 1.5, keep=mask)
    assert torch.allclose(parts.nckd, nckd, atol=1e-10)
    assert torch.allclose(parts.tckd, tckd, atol=1e-10), "TCKD is not masked"
    # The student's ranking does not matter: only the teacher's logits pick the classes.
    parts_perm = kd_parts(zs.flip(1), zt, y, temperature=1.5, topk=k, reduction="none")
    assert not torch.allclose(parts_perm.nckd, parts.nckd)
    assert torch.equal(topk_nontarget_mask(zt, y, k), mask)


def test_gradients_finite_and_only_to_student():
    zs, zt, y = _logits(32, 81, seed=6, scale=30.0, dtype=torch.float32)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    parts = kd_parts(zs, zt, y, temperature=1.0, topk=5)
    (parts.tckd + parts.nckd).backward()
    assert torch.isfinite(zs.grad).all()
    assert zt.grad is None
    # Classes outside the mask (and not the target) get no NCKD gradient; TCKD still moves them.
    zs.grad = None
    kd_parts(zs, zt, y, temperature=1.0, topk=5).nckd.backward()
    mask = topk_nontarget_mask(zt, y, 5)
    removed = ~mask & ~F.one_hot(y, 81).bool()
    assert torch.count_nonzero(zs.grad[removed]) == 0
    assert torch.count_nonzero(zs.grad[mask]) > 0


def test_gradient_matches_autograd_of_naive_formula():
    zs, zt, y = _logits(6, 5, seed=8)
    zs1 = zs.clone().requires_grad_(True)
    zs2 = zs.clone().requires_grad_(True)
    p = kd_parts(zs1, zt, y, temperature=2.0, topk=2)
    (p.tckd + 3 * p.nckd).backward()
    keep = topk_nontarget_mask(zt, y, 2)
    tckd, nckd = _naive_parts(zs2, zt, y, 2.0, keep=keep)
    (tckd.mean() + 3 * nckd.mean()).backward()
    assert torch.allclose(zs1.grad, zs2.grad, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(dtype):
    zs, zt, y = _logits(16, 81, seed=7, scale=8.0, dtype=torch.float32)
    ref = kd_parts(zs.to(dtype).float(), zt.to(dtype).float(), y, reduction="none")
    low = kd_parts(zs.to(dtype), zt.to(dtype), y, reduction="none")
    assert low.tckd.dtype == torch.float32
    assert torch.equal(low.tckd, ref.tckd) and torch.equal(low.nckd, ref.nckd)


def test_confident_teacher_does_not_underflow():
    # p_t[y] rounds to 1 in float32: log(1 - p_y) must still be finite.
    zs, zt, y = _logits(4, 10, seed=12, dtype=torch.float32)
    zt[torch.arange(4), y] = 200.0
    parts = kd_parts(zs, zt, y, reduction="none")
    assert torch.isfinite(parts.tckd).all() and torch.isfinite(parts.nckd).all()


def test_logit_standardisation_applied_to_both():
    zs, zt, y = _logits(8, 10, seed=13)
    got = kd_parts(zs, zt, y, temperature=2.0, logit_stand=True, reduction="none")
    ref = kd_parts(standardize_logits(zs), standardize_logits(zt), y, temperature=2.0, reduction="none")
    assert torch.allclose(got.tckd, ref.tckd) and torch.allclose(got.nckd, ref.nckd)
    z = standardize_logits(zs)
    assert torch.allclose(z.mean(1), torch.zeros(8, dtype=z.dtype), atol=1e-12)
    assert torch.allclose(z.std(1), torch.ones(8, dtype=z.dtype), atol=1e-6)
    # invariant to a per-row affine change of the logits
    shifted = kd_parts(zs * 3 + 5, zt * 0.5 - 2, y, temperature=2.0, logit_stand=True, reduction="none")
    assert torch.allclose(shifted.nckd, got.nckd, atol=1e-9)


def test_reductions_and_warmup():
    zs, zt, y = _logits(10, 6, seed=14)
    none = kd_parts(zs, zt, y, reduction="none")
    assert torch.allclose(kd_parts(zs, zt, y).tckd, none.tckd.mean())
    assert torch.allclose(kd_parts(zs, zt, y, reduction="sum").nckd, none.nckd.sum())
    assert warmup_factor(5, 20) == 0.25 and warmup_factor(40, 20) == 1.0 and warmup_factor(3, 0) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(topk=0), "at least one"),
        (dict(topk=torch.tensor([1, 0, 2, 2])), "at least one"),
        (dict(topk=torch.tensor([1, 2])), "entries"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="avg"), "reduction"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    zs, zt, y = _logits(4, 6, seed=15)
    with pytest.raises(ValueError, match=match):
        kd_parts(zs, zt, y, **kwargs)


def test_shape_mismatch_raises():
    zs, zt, y = _logits(4, 6, seed=16)
    with pytest.raises(ValueError, match="N x C"):
        kd_parts(zs, zt[:, :5], y)
    with pytest.raises(ValueError, match="target"):
        kd_parts(zs, zt, y[:3])
