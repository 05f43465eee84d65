"""The released code's semantics as options: the top-k ranking over all classes and mdistiller's DOT.

Every expected number is computed by hand (closed forms in the comments) or by a plain replica
of the released update written here from its description (docs/methods.md, "Release compatibility").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepkd_det.core.losses import kd_components, kd_loss, kd_parts, topk_nontarget_mask
from deepkd_det.core.optim import DOTOptimizer
from deepkd_det.core.settings import DEEPKD_DEFAULTS, build_decoupled_optimizer, topk_rank
from deepkd_det.core.step import DecoupledStep

# ---------------------------------------------------------------------- top-k ranking

ZT = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
ZS = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
Y0 = torch.tensor([0])


def _nckd(k, rank, zs=ZS, zt=ZT, y=Y0, t=1.0):
    return float(kd_parts(zs, zt, y, temperature=t, topk=k, topk_rank=rank).nckd)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_minimal_case_paper_ranking_vs_release_ranking():
    # Paper, K=2: classes {1, 2}; q_t = [s, 1-s], q_s = [1-s, s] with s = sigmoid(1), so
    # KL = (2s - 1) * log(s / (1 - s)) = 2s - 1.
    assert _nckd(2, "nontarget") == pytest.approx(2 * _sigmoid(1.0) - 1, abs=1e-6)
    assert _nckd(2, "nontarget") == pytest.approx(0.462117, abs=1e-6)
    # Paper, K=1: one class, KL of two point masses = 0.
    assert _nckd(1, "nontarget") == pytest.approx(0.0, abs=1e-7)
    # Release, K=2: the teacher's top 2 are {0 (the target), 1}; minus the target one class is
    # left, so NCKD = 0.
    assert _nckd(2, "all") == pytest.approx(0.0, abs=1e-7)
    # Release, K=1: top 1 = the target, nothing is left and the released softmax runs over all
    # classes: full KD, KL(softmax(zt) || softmax(zs)).
    pt = [math.exp(v) / sum(math.exp(u) for u in ZT[0].tolist()) for v in ZT[0].tolist()]
    ps = [math.exp(v) / sum(math.exp(u) for u in ZS[0].tolist()) for v in ZS[0].tolist()]
    full_kd = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert _nckd(1, "all") == pytest.approx(full_kd, abs=1e-6)
    assert _nckd(1, "all") == pytest.approx(0.818731, abs=1e-6)
    assert _nckd(1, "all") == pytest.approx(float(kd_loss(ZS, ZT)), abs=1e-6)
    # Release, K=3: {1, 2} survive, the paper's K=2.
    assert _nckd(3, "all") == pytest.approx(0.462117, abs=1e-6)


def test_release_masks_by_hand():
    y = torch.tensor([0, 4, 2])
    zt = torch.tensor([[5.0, 4, 3, 2, 1], [5.0, 4, 3, 2, 1], [1.0, 2, 9, 4, 3]])
    m = topk_nontarget_mask(zt, y, 2, rank="all").tolist()
    assert m[0] == [False, True, False, False, False]  # target ranked 1st: K - 1 = 1 kept
    assert m[1] == [True, True, False, False, False]  # target ranked last: K kept, as the paper
    assert m[2] == [False, False, False, True, False]  # target ranked 1st
    # Degenerate row (K=1, target first): every class, target included.
    assert topk_nontarget_mask(zt, y, 1, rank="all").tolist()[0] == [True] * 5
    # Per-row K.
    per_row = topk_nontarget_mask(zt, y, torch.tensor([3, 1, 2]), rank="all").tolist()
    assert per_row == [[False, True, True, False, False], [True, False, False, False, False], m[2]]


def test_rankings_agree_when_the_teacher_ranks_the_target_outside_the_top_k():
    torch.manual_seed(0)
    n, c = 64, 10
    zt = torch.randn(n, c) * 3
    zs = torch.randn(n, c, requires_grad=True)
    for k in (1, 3, 6):
        # a target the teacher ranks below the top K: its k-th best class or worse
        order = zt.argsort(dim=1, descending=True)
        y = order[torch.arange(n), torch.randint(k, c, (n,))]
        a = topk_nontarget_mask(zt, y, k, rank="nontarget")
        b = topk_nontarget_mask(zt, y, k, rank="all")
        assert torch.equal(a, b) and bool((a.sum(1) == k).all())
        pa = kd_parts(zs, zt, y, 2.0, k, topk_rank="nontarget", reduction="none").nckd
        pb = kd_parts(zs, zt, y, 2.0, k, topk_rank="all", reduction="none").nckd
        torch.testing.assert_close(pa, pb)


def test_no_mask_bounds_of_each_ranking():
    torch.manual_seed(1)
    n, c = 16, 6
    zt, zs = torch.randn(n, c), torch.randn(n, c)
    y = torch.randint(0, c, (n,))
    y[: n // 2] = zt[: n // 2].argmin(dim=1)  # half the rows: the teacher ranks the target last
    full = kd_parts(zs, zt, y, 2.0, None, reduction="none").nckd
    for k in (c - 1, c, c + 3):  # paper: K >= C - 1 keeps every non-target class
        torch.testing.assert_close(kd_parts(zs, zt, y, 2.0, k, reduction="none").nckd, full)
    for k in (c, c + 3):  # release: K >= C
        torch.testing.assert_close(kd_parts(zs, zt, y, 2.0, k, topk_rank="all", reduction="none").nckd, full)
    # Release, K = C - 1: a row drops its teacher's lowest non-target class unless the target
    # is that lowest class.
    target_last = y == zt.argmin(dim=1)
    mask = topk_nontarget_mask(zt, y, c - 1, rank="all")
    assert 0 < int(target_last.sum()) < n
    assert bool((mask.sum(1) == torch.where(target_last, c - 1, c - 2)).all())


def _release_nckd_rows(zs, zt, y, t, k):
    """Plain replica of the released top-k NCKD: a removed-class mask from torch.topk over all
    classes (target included), the target removed, then softmax(z / T - 1000 * removed)."""
    _, top = torch.topk(zt, k=min(k, zt.shape[1]), dim=1)
    removed = torch.ones_like(zt)
    removed[torch.arange(zt.shape[0]).unsqueeze(1).expand_as(top), top] = 0
    removed.scatter_(1, y.unsqueeze(1), 1)
    pt = F.softmax(zt / t - 1000.0 * removed, dim=1)
    log_ps = F.log_softmax(zs / t - 1000.0 * removed, dim=1)
    return F.kl_div(log_ps, pt, reduction="none").sum(1) * t * t


def test_release_ranking_matches_a_replica_of_the_released_computation():
    torch.manual_seed(2)
    n, c = 48, 7
    zt = torch.randn(n, c, dtype=torch.float64) * 2  # continuous: no ties between classes
    zs = torch.randn(n, c, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    for k in range(1, c + 2):
        ours = kd_parts(zs, zt, y, 3.0, k, topk_rank="all", reduction="none").nckd
        torch.testing.assert_close(ours, _release_nckd_rows(zs, zt, y, 3.0, k), rtol=1e-9, atol=1e-9)


def test_kd_components_release_weighting_minimal_case():
    zs = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 1]])
    zt = torch.tensor([[3.0, 1, 0, 0], [0, 1, 3, 0]])
    y = torch.tensor([0, 2])
    tcg, ncg = kd_components(zs, zt, y, temperature=4.0, weight=1.0, coupling="batch")
    assert (float(tcg), float(ncg)) == pytest.approx((0.903652, 0.066565), abs=2e-6)
    half = kd_components(zs, zt, y, temperature=4.0, weight=0.5, coupling="batch")
    assert [float(v) for v in half] == pytest.approx([0.451826, 0.033283], abs=2e-6)


def test_rank_setting_auto_follows_compat():
    class Node(dict):
        __getattr__ = dict.__getitem__

    def node(compat, rank):
        return Node(COMPAT=compat, TOPK=Node(RANK=rank))

    assert DEEPKD_DEFAULTS["TOPK"]["RANK"] == "auto"
    assert topk_rank(node("paper", "auto")) == "nontarget"
    assert topk_rank(node("official", "auto")) == "all"
    assert topk_rank(node("official", "nontarget")) == "nontarget"
    assert topk_rank(node("paper", "all")) == "all"
    with pytest.raises(ValueError, match="topk rank must be one of"):
        topk_nontarget_mask(ZT, Y0, 2, rank="target")


# ------------------------------------------------------------------- mdistiller's DOT


def mdistiller_dot(w, steps, lr, mu_task, mu_kd, wd, damp=0.0):
    """Plain-python replica of mdistiller's DOT update on scalars (megvii-research/mdistiller).

    ``steps``: per step a dict name -> (task grad or None, kd grad or None). Task first:
    d = g + wd * w; buffer = d first, else mu * buf + (1 - damp) * d with mu = mu_task if the
    parameter has a kd gradient this step, else the mean; no buffer when mu_task == 0.
    Then kd: buffer = g first (no weight decay), else mu_kd * buf + (1 - damp) * g if it has a
    task gradient, else mean * buf + (1 - damp) * (g + wd * w). Each update w -= lr * buffer.
    """
    w = dict(w)
    task_buf, kd_buf = {}, {}
    mean = (mu_task + mu_kd) / 2
    for grads in steps:
        for name, (gt, gk) in grads.items():
            if gt is None:
                continue
            d = gt + wd * w[name]
            if mu_task != 0:
                if name not in task_buf:
                    task_buf[name] = d
                else:
                    task_buf[name] = (mu_task if gk is not None else mean) * task_buf[name] + (1 - damp) * d
                d = task_buf[name]
            w[name] -= lr * d
        for name, (gt, gk) in grads.items():
            if gk is None:
                continue
            if name not in kd_buf:
                kd_buf[name] = gk
            elif gt is not None:
                kd_buf[name] = mu_kd * kd_buf[name] + (1 - damp) * gk
            else:
                kd_buf[name] = mean * kd_buf[name] + (1 - damp) * (gk + wd * w[name])
            w[name] -= lr * kd_buf[name]
    return w


def run_dot(steps, compat, lr, momentum, delta, wd, damp=0.0, names=("task_only", "kd_only", "both")):
    params = {n: torch.zeros((), dtype=torch.float64, requires_grad=True) for n in names}
    opt = DOTOptimizer(list(params.values()), lr=lr, momentum=momentum, delta=delta, weight_decay=wd,
                       dampening=damp, compat=compat)
    order = list(params)
    for grads in steps:
        for comp, idx in (("task", 0), ("kd", 1)):
            g = [None if grads.get(n, (None, None))[idx] is None else torch.tensor(grads[n][idx], dtype=torch.float64)
                 for n in order]
            opt.fold(comp, g)
        opt.step()
    return {n: float(p.detach()) for n, p in params.items()}


def test_dot_two_steps_paper_vs_mdistiller_by_hand():
    # lr 1, mu 0.9, d 0.075 (task 0.825, kd 0.975, mean 0.9), wd 0.1, gradient 1, from 0.
    steps = [{"task_only": (1.0, None), "kd_only": (None, 1.0)}] * 2
    paper = run_dot(steps, "paper", 1.0, 0.9, 0.075, 0.1, names=("task_only", "kd_only"))
    official = run_dot(steps, "official", 1.0, 0.9, 0.075, 0.1, names=("task_only", "kd_only"))
    # paper, task only: m = 1, w = -1; m = 0.825 + (1 + 0.1 * -1) = 1.725, w = -2.725
    # paper, kd only (no weight decay): m = 1, w = -1; m = 0.975 + 1, w = -2.975
    assert paper == pytest.approx({"task_only": -2.725, "kd_only": -2.975}, abs=1e-12)
    # mdistiller, both: m = 1, w = -1; m = 0.9 * 1 + (1 + 0.1 * -1) = 1.8, w = -2.8
    assert official == pytest.approx({"task_only": -2.8, "kd_only": -2.8}, abs=1e-12)
    replica = mdistiller_dot({"task_only": 0.0, "kd_only": 0.0}, steps, 1.0, 0.825, 0.975, 0.1)
    assert official == pytest.approx(replica, abs=1e-12)


@pytest.mark.parametrize("momentum,delta,damp", [(0.9, 0.075, 0.0), (0.8, 0.1, 0.3), (0.075, 0.075, 0.2)])
def test_dot_official_follows_the_mdistiller_replica(momentum, delta, damp):
    """Varying gradients, a parameter with both gradients, and parameters whose set of
    gradients changes between steps (first kd step after task steps and the reverse)."""
    g = torch.Generator().manual_seed(3)

    def r():
        return float(torch.randn((), generator=g, dtype=torch.float64))

    names = ("task_only", "kd_only", "both", "switch", "late_kd")
    steps = []
    for i in range(5):
        steps.append({
            "task_only": (r(), None),
            "kd_only": (None, r()),
            "both": (r(), r()),
            "switch": (r(), None) if i % 2 == 0 else (None, r()),
            "late_kd": (r(), None if i < 2 else r()),
        })
    official = run_dot(steps, "official", 0.1, momentum, delta, 0.05, damp, names)
    replica = mdistiller_dot({n: 0.0 for n in names}, steps, 0.1, momentum - delta, momentum + delta, 0.05, damp)
    assert official == pytest.approx(replica, abs=1e-12)
    paper = run_dot(steps, "paper", 0.1, momentum, delta, 0.05, damp, names)
    if momentum - delta > 0:  # both gradients: the paper's update (mdistiller has no task buffer at 0)
        assert paper["both"] == pytest.approx(official["both"], abs=1e-12)
    assert paper["task_only"] != pytest.approx(official["task_only"], abs=1e-6)


def test_dot_official_from_settings_through_the_decoupled_step():
    """DEEPKD.OPTIMIZER dot + COMPAT official builds mdistiller's DOT; a real backward pass
    through DecoupledStep gives the replica's weights (bias: task only; w: both)."""

    class Node(dict):
        __getattr__ = dict.__getitem__

    node = Node({**DEEPKD_DEFAULTS, "ENABLED": True, "OPTIMIZER": "dot", "COMPAT": "official",
                 "GSNR": Node(DEEPKD_DEFAULTS["GSNR"])})
    w = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    v = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)  # kd only
    opt = build_decoupled_optimizer(node, [w, b, v], lr=0.1, momentum=0.9, weight_decay=0.01)
    assert isinstance(opt, DOTOptimizer) and opt.compat == "official"
    step = DecoupledStep(opt, node["GRAD_STRATEGY"])
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    history = []
    for _ in range(3):
        ref = {k: t.detach().clone() for k, t in (("w", w), ("b", b), ("v", v))}
        task = (x @ w + b - 1.0) ** 2
        kd = (x @ w) ** 2 * 0.5 + (v - 0.1) ** 2
        g_task = torch.autograd.grad(task, [w, b], retain_graph=True)
        g_kd = torch.autograd.grad(kd, [w, v], retain_graph=True)
        history.append((ref, g_task, g_kd))
        step(opt.component_losses(tog=task, tcg=kd))
        opt.step()
    # replica, element by element (the update is elementwise)
    steps = []
    for _, (gw, gb), (gkw, gkv) in history:
        steps.append({"w0": (float(gw[0]), float(gkw[0])), "w1": (float(gw[1]), float(gkw[1])),
                      "b": (float(gb), None), "v": (None, float(gkv))})
    start = {"w0": 0.5, "w1": -0.3, "b": 0.2, "v": 0.7}
    want = mdistiller_dot(start, steps, 0.1, 0.825, 0.975, 0.01)
    got = {"w0": float(w[0].detach()), "w1": float(w[1].detach()), "b": float(b.detach()), "v": float(v.detach())}
    assert got == pytest.approx(want, abs=1e-12)


def test_dot_paper_checkpoint_loads_into_official_mode():
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    paper = DOTOptimizer([p], lr=1.0, momentum=0.9, delta=0.075, weight_decay=0.1)
    paper.fold("task", [torch.tensor(1.0, dtype=torch.float64)])
    paper.step()
    official = DOTOptimizer([p], lr=1.0, momentum=0.9, delta=0.075, weight_decay=0.1, compat="official")
    official.load_state_dict(paper.state_dict())
    assert float(official.momentum_buffer(p, "task")) == pytest.approx(1.0)
    official.fold("task", [torch.tensor(1.0, dtype=torch.float64)])
    official.step()
    assert float(p.detach()) == pytest.approx(-2.8)
    with pytest.raises(ValueError, match="compat must be one of"):
        DOTOptimizer([p], lr=1.0, compat="mdistiller")
