"""Sigmoid (dense-head) KD/DKD against independent computations (docs/maths.md §9)."""

import math

import pytest
import torch

from deepkd_det.core.dense_kd import (
    binary_kl,
    dense_kd_components,
    dense_nontarget_mask,
    dense_num_nontarget,
)
from deepkd_det.core.topk import TopKSchedule

K = 5


def _case(n=23, k=K, seed=0, scale=3.0, dtype=torch.float64):
    """Random logits and labels with every kind of anchor: ignored, positive of each class, background."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, k, generator=g, dtype=dtype) * scale
    zt = torch.randn(n, k, generator=g, dtype=dtype) * scale
    labels = torch.randint(-1, k + 1, (n,), generator=g)
    labels[:3] = torch.tensor([-1, 0, k])
    return zs, zt, labels


def _bkl_naive(s, t, T):
    """T^2 [p log(p/q) + (1-p) log((1-p)/(1-q))], one scalar at a time from the definition (float64)."""
    p = 1.0 / (1.0 + math.exp(-t / T))
    q = 1.0 / (1.0 + math.exp(-s / T))
    return T * T * (p * math.log(p / q) + (1.0 - p) * math.log((1.0 - p) / (1.0 - q)))


def _reference(zs, zt, labels, T, negatives="nontarget", keep=None):
    """(target sum, non-target sum, number of positives) by explicit loops."""
    tgt = nt = 0.0
    npos = 0
    for a in range(zs.shape[0]):
        y = int(labels[a])
        if y == -1 or (y == zs.shape[1] and negatives == "ignore"):
            continue
        npos += y < zs.shape[1]
        for c in range(zs.shape[1]):
            b = _bkl_naive(float(zs[a, c]), float(zt[a, c]), T)
            if c == y:
                tgt += b
            elif keep is None or keep[a][c]:
                nt += b
    return tgt, nt, npos


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("negatives", ["nontarget", "ignore"])
def test_parts_sum_to_the_full_binary_kl_against_a_float64_reference(T, negatives):
    zs, zt, labels = _case(seed=1)
    tgt, nt = dense_kd_components(zs, zt, labels, K, temperature=T, negatives=negatives)
    ref_t, ref_nt, npos = _reference(zs, zt, labels, T, negatives)
    m = max(1, npos)
    assert tgt.item() == pytest.approx(ref_t / m, rel=1e-10)
    assert nt.item() == pytest.approx(ref_nt / m, rel=1e-10)
    # KD over all classes of the counted anchors, straight from binary_kl: the parts add up to it.
    counted = (labels >= 0) & ((labels < K) | (negatives == "nontarget"))
    full = binary_kl(zs, zt, T)[counted].sum() / m
    assert (tgt + nt).item() == pytest.approx(full.item(), rel=1e-12)


def test_binary_kl_elementwise_and_finite_for_extreme_logits():
    zs = torch.tensor([[0.3, -40.0, 60.0, 2.0]], dtype=torch.float64)
    zt = torch.tensor([[-1.2, 35.0, 58.0, 2.0]], dtype=torch.float64)
    got = binary_kl(zs, zt, 1.0)
    assert torch.isfinite(got).all()
    for c in (0, 3):
        assert got[0, c].item() == pytest.approx(_bkl_naive(float(zs[0, c]), float(zt[0, c]), 1.0), rel=1e-10)
    assert got[0, 3].item() == 0.0
    assert got[0, 1].item() == pytest.approx(40.0, rel=1e-6)  # p ~ 1, q ~ e^-40: p log(p/q) ~ 40, rest ~ 35 e^-35
    # float32 input: float32 computation, close to float64
    got32 = binary_kl(zs.float(), zt.float(), 1.0)
    assert got32.dtype == torch.float32
    assert torch.allclose(got32.double(), got, rtol=1e-4, atol=1e-4)


def test_kd_is_dkd_with_unit_weights_and_alpha_beta_scale_their_parts():
    zs, zt, labels = _case(seed=2)
    tgt, nt = dense_kd_components(zs, zt, labels, K, temperature=2.0)
    tgt2, nt2 = dense_kd_components(zs, zt, labels, K, temperature=2.0, alpha=0.5, beta=3.0, warmup=0.25)
    assert tgt2.item() == pytest.approx(0.25 * 0.5 * tgt.item(), rel=1e-12)
    assert nt2.item() == pytest.approx(0.25 * 3.0 * nt.item(), rel=1e-12)


def test_topk_all_nontarget_classes_equals_no_mask():
    zs, zt, labels = _case(seed=3)
    # Without negatives every counted anchor has K - 1 non-target classes: k = K - 1 is no mask.
    none = dense_kd_components(zs, zt, labels, K, negatives="ignore")
    full = dense_kd_components(zs, zt, labels, K, negatives="ignore", topk=K - 1)
    assert full[1].item() == pytest.approx(none[1].item(), rel=1e-12)
    # With negatives they have K: k = K - 1 drops one class of each negative, k = K is no mask.
    none = dense_kd_components(zs, zt, labels, K)
    assert dense_kd_components(zs, zt, labels, K, topk=K)[1].item() == pytest.approx(none[1].item(), rel=1e-12)
    assert dense_kd_components(zs, zt, labels, K, topk=K - 1)[1].item() < none[1].item()
    # TCKD is never masked
    assert dense_kd_components(zs, zt, labels, K, topk=1)[0].item() == pytest.approx(none[0].item(), rel=1e-12)
    assert dense_num_nontarget(K, "nontarget") == K and dense_num_nontarget(K, "ignore") == K - 1


def test_topk_keeps_exactly_the_teachers_largest_nontarget_classes_hand_example():
    zt = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0],  # positive of class 0: non-target 1..4, top-2 -> {1, 2}
            [5.0, 4.0, 3.0, 2.0, 1.0],  # positive of class 2: non-target 0,1,3,4 -> {0, 1}
            [0.0, -1.0, 7.0, 7.0, 2.0],  # background: all five; top-2 -> {2, 3} (tie: lower index)
            [1.0, 9.0, 1.0, 1.0, 8.0],  # ignored: mask computed like background {1, 4}, never counted
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 2, K, -1])
    mask = dense_nontarget_mask(zt, labels, K, topk=2)
    expected = torch.tensor(
        [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    # a three-way tie for the last place goes to the lowest indices
    tie = dense_nontarget_mask(torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]]), torch.tensor([K]), K, topk=2)
    assert tie.tolist() == [[True, True, False, False, False]]
    # per-anchor budgets
    mask = dense_nontarget_mask(zt, labels, K, topk=torch.tensor([1, 4, 3, 1]))
    assert mask.sum(1).tolist() == [1, 4, 3, 1]
    assert mask[0].tolist() == [False, True, False, False, False]
    # and the loss sums exactly the kept entries
    zs = torch.randn(4, K, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, nt = dense_kd_components(zs, zt, labels, K, topk=2)
    keep = dense_nontarget_mask(zt, labels, K, topk=2).tolist()
    ref_t, ref_nt, npos = _reference(zs, zt, labels, 1.0, keep=keep)
    assert npos == 2
    assert nt.item() == pytest.approx(ref_nt / 2, rel=1e-10)


def test_zero_when_student_equals_teacher():
    _, zt, labels = _case(seed=5)
    tgt, nt = dense_kd_components(zt.clone(), zt, labels, K, temperature=3.0, topk=2)
    assert abs(tgt.item()) < 1e-12 and abs(nt.item()) < 1e-12


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_gradient_is_T_times_q_minus_p_over_the_normalizer(T):
    zs, zt, labels = _case(n=9, seed=6)
    zs.requires_grad_(True)
    tgt, nt = dense_kd_components(zs, zt, labels, K, temperature=T, topk=3, normalizer=2.5)
    (tgt + nt).backward()
    q, p = torch.sigmoid(zs.detach() / T), torch.sigmoid(zt / T)
    counted = ((labels >= 0) & (labels <= K))[:, None]
    onehot = torch.zeros(9, K, dtype=torch.bool)
    for a, y in enumerate(labels.tolist()):
        if 0 <= y < K:
            onehot[a, y] = True
    used = counted & (onehot | dense_nontarget_mask(zt, labels, K, topk=3))
    expected = torch.where(used, T * (q - p) / 2.5, torch.zeros_like(q))
    assert torch.allclose(zs.grad, expected, rtol=1e-10, atol=1e-14)
    assert (zs.grad[labels == -1] == 0).all()


def test_ignored_anchors_contribute_nothing():
    zs, zt, labels = _case(seed=7)
    base = dense_kd_components(zs, zt, labels, K, topk=3)
    zs2, zt2 = zs.clone(), zt.clone()
    ignored = labels == -1
    assert ignored.any()
    zs2[ignored] = 50.0  # wildly different outputs on ignored anchors
    zt2[ignored] = -50.0
    other = dense_kd_components(zs2, zt2, labels, K, topk=3)
    assert other[0].item() == base[0].item() and other[1].item() == base[1].item()
    # dropping the ignored rows altogether gives the same numbers
    kept = dense_kd_components(zs[~ignored], zt[~ignored], labels[~ignored], K, topk=3)
    assert kept[1].item() == pytest.approx(base[1].item(), rel=1e-12)


def test_negatives_option_changes_exactly_the_negative_anchors_terms():
    zs, zt, labels = _case(seed=8)
    neg = labels == K
    assert neg.any()
    t_in, nt_in = dense_kd_components(zs, zt, labels, K, topk=3, negatives="nontarget")
    t_out, nt_out = dense_kd_components(zs, zt, labels, K, topk=3, negatives="ignore")
    npos = int(((labels >= 0) & (labels < K)).sum())
    assert t_in.item() == t_out.item()  # the target part has no negatives in it
    neg_terms = (binary_kl(zs, zt) * dense_nontarget_mask(zt, labels, K, topk=3))[neg].sum() / npos
    assert (nt_in - nt_out).item() == pytest.approx(neg_terms.item(), rel=1e-10)


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_temperature_is_T_squared_times_the_unit_temperature_loss_on_scaled_logits(T):
    zs, zt, labels = _case(seed=9)
    at_t = dense_kd_components(zs, zt, labels, K, temperature=T, topk=2)
    unit = dense_kd_components(zs / T, zt / T, labels, K, temperature=1.0, topk=2)
    for a, b in zip(at_t, unit):
        assert a.item() == pytest.approx(T * T * b.item(), rel=1e-10)


def test_normalizer_default_and_override():
    zs, zt, labels = _case(seed=10)
    npos = int(((labels >= 0) & (labels < K)).sum())
    a = dense_kd_components(zs, zt, labels, K)
    b = dense_kd_components(zs, zt, labels, K, normalizer=1.0)
    assert a[1].item() == pytest.approx(b[1].item() / npos, rel=1e-12)
    # no positive anchor: divided by 1, the target part is 0
    bg = torch.full((6,), K)
    t, nt = dense_kd_components(zs[:6], zt[:6], bg, K)
    assert t.item() == 0.0
    assert nt.item() == pytest.approx(binary_kl(zs[:6], zt[:6]).sum().item(), rel=1e-12)


def test_works_with_the_topk_schedule_and_float16_inputs():
    zs, zt, labels = _case(seed=11, dtype=torch.float32)
    sched = TopKSchedule(dense_num_nontarget(K), mode="linear", k_start=2, start=0.0, end=0.5)
    assert sched.topk_arg(1.0) is None  # the last K is no mask
    k = sched.topk_arg(0.0)
    t16, nt16 = dense_kd_components(zs.half(), zt.half(), labels, K, topk=k)
    t32, nt32 = dense_kd_components(zs.half().float(), zt.half().float(), labels, K, topk=k)
    assert t16.dtype == torch.float32
    assert t16.item() == pytest.approx(t32.item(), rel=1e-6) and nt16.item() == pytest.approx(nt32.item(), rel=1e-6)


def test_bad_input():
    zs, zt, labels = _case(n=4, seed=12)
    with pytest.raises(ValueError, match="num_classes"):
        dense_kd_components(zs, zt, labels, K + 1)
    with pytest.raises(ValueError, match="labels must lie"):
        dense_kd_components(zs, zt, torch.tensor([0, 1, K + 1, -1]), K)
    with pytest.raises(ValueError, match="labels must have shape"):
        dense_kd_components(zs, zt, labels[:3], K)
    with pytest.raises(ValueError, match="negatives"):
        dense_kd_components(zs, zt, labels, K, negatives="background")
    with pytest.raises(ValueError, match="temperature"):
        dense_kd_components(zs, zt, labels, K, temperature=0.0)
    with pytest.raises(ValueError, match="normalizer"):
        dense_kd_components(zs, zt, labels, K, normalizer=0.0)
    with pytest.raises(ValueError, match="K >= 1|at least one"):
        dense_kd_components(zs, zt, labels, K, topk=0)
    with pytest.raises(ValueError, match="same shape|both be"):
        dense_kd_components(zs, zt[:, :3], labels, K)


@pytest.mark.cuda
def test_cuda_matches_cpu_with_labels_on_the_cpu():
    zs, zt, labels = _case(n=64, seed=13, dtype=torch.float32)
    cpu = dense_kd_components(zs, zt, labels, K, temperature=2.0, topk=2)
    gpu = dense_kd_components(zs.cuda().half(), zt.cuda().half(), labels, K, temperature=2.0, topk=2)
    ref = dense_kd_components(zs.half().float(), zt.half().float(), labels, K, temperature=2.0, topk=2)
    assert gpu[0].device.type == "cuda"
    for g, r in zip(gpu, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-5, atol=1e-6)
    assert cpu[0].item() > 0
