"""DeepKDOptimizer / DOTOptimizer against straightforward per-parameter reference loops."""

import io
import random

import pytest
import torch

from deepkd_det.core.optim import DeepKDOptimizer, DOTOptimizer

SHAPES = [(3, 4), (4,), (2, 3, 3), (5,), (6,), (7,), (2, 2)]
GROUP_OF = [0, 0, 0, 1, 1, 1, 1]
GROUPS = [
    dict(lr=0.1, weight_decay=1e-2, dampening=0.0, momentum=0.9),
    dict(lr=0.03, weight_decay=3e-3, dampening=0.1, momentum=0.8),
]
DELTAS = dict(tog=0.075, tcg=-0.075, ncg=0.05)
NUM_STEPS = 6
SAVE_AT = 3


def _has(component, index, step):
    """Which parameter receives which component at which step (some never, some sometimes)."""
    if index == 1 and component == "tcg":
        return False  # never a TCG gradient
    if index == 3 and component == "tog":
        return False  # KD-only parameter
    if index == 4 and step == 2 and component != "tog":
        return False  # TOG only at step 2
    if index == 2 and step == 0 and component == "ncg":
        return False  # first NCG fold happens at step 1
    if index == 5:
        return component == "tcg"  # TCG only
    if index == 6:
        return component == "ncg"  # NCG only
    return True


def _make_grads(seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(NUM_STEPS):
        out.append(
            {
                c: {i: torch.randn(s, generator=gen, dtype=torch.float64) for i, s in enumerate(SHAPES) if _has(c, i, step)}
                for c in ("tog", "tcg", "ncg")
            }
        )
    return out


def _lr_factor(step):
    return 1.0 / (1.0 + 0.5 * step)


def _init_weights():
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    weights[0] = weights[0].t().contiguous().t()  # a non-contiguous parameter (3, 4) with strides (1, 3)
    return weights


def _momentum(g, component):
    return GROUPS[g]["momentum"] + DELTAS[component]


def reference_paper(weights, grads_per_step):
    """The paper update (docs/maths.md), one parameter and one component at a time."""
    w = [x.clone() for x in weights]
    m = {}
    for step, grads in enumerate(grads_per_step):
        update = [torch.zeros_like(x) for x in w]
        for c in ("tog", "tcg", "ncg"):
            for i, g in grads[c].items():
                grp = GROUPS[GROUP_OF[i]]
                if c == "tog":
                    g = g + grp["weight_decay"] * w[i]
                if (i, c) not in m:
                    m[i, c] = g.clone()
                else:
                    m[i, c] = _momentum(GROUP_OF[i], c) * m[i, c] + (1 - grp["dampening"]) * g
                update[i] = update[i] + m[i, c]
        for i in range(len(w)):
            w[i] = w[i] - GROUPS[GROUP_OF[i]]["lr"] * _lr_factor(step) * update[i]
    return w, m


def reference_official(weights, grads_per_step):
    """The released reference update: TOG, then NCG, then TCG, with its branch order and weight decay."""
    w = [x.clone() for x in weights]
    m = {}
    for step, grads in enumerate(grads_per_step):
        gt, gc, gn = grads["tog"], grads["tcg"], grads["ncg"]
        for i in range(len(w)):
            grp = GROUPS[GROUP_OF[i]]
            lr, wd, damp = grp["lr"] * _lr_factor(step), grp["weight_decay"], grp["dampening"]
            mu = {c: _momentum(GROUP_OF[i], c) for c in ("tog", "tcg", "ncg")}
            mu_mean = (mu["tog"] + mu["tcg"] + mu["ncg"]) / 3
            if i in gt:
                d = gt[i]
                if (i, "tog") not in m:
                    m[i, "tog"] = d.clone()
                elif i in gc:
                    m[i, "tog"] = mu["tcg"] * m[i, "tog"] + (1 - damp) * d
                elif i in gn:
                    m[i, "tog"] = mu["ncg"] * m[i, "tog"] + (1 - damp) * d
                else:
                    m[i, "tog"] = mu_mean * m[i, "tog"] + (1 - damp) * d
                w[i] = w[i] - lr * m[i, "tog"]
            if i in gn:
                d = gn[i]
                if (i, "ncg") not in m:
                    m[i, "ncg"] = d.clone()
                elif i in gt:
                    m[i, "ncg"] = mu["ncg"] * m[i, "ncg"] + (1 - damp) * d
                elif i in gc:
                    m[i, "ncg"] = mu["tcg"] * m[i, "ncg"] + (1 - damp) * d
                else:
                    m[i, "ncg"] = mu_mean * m[i, "ncg"] + (1 - damp) * (d + wd * w[i])
                w[i] = w[i] - lr * m[i, "ncg"]
            if i in gc:
                d = gc[i] + wd * w[i]
                if (i, "tcg") not in m:
                    m[i, "tcg"] = d.clone()
                elif i in gt:
                    m[i, "tcg"] = mu["tcg"] * m[i, "tcg"] + (1 - damp) * d
                elif i in gn:
                    m[i, "tcg"] = mu["ncg"] * m[i, "tcg"] + (1 - damp) * d
                else:
                    m[i, "tcg"] = mu_mean * m[i, "tcg"] + (1 - damp) * (d + wd * w[i])
                w[i] = w[i] - lr * m[i, "tcg"]
    return w, m


def _build(params, compat, block_bytes=None, kernel="auto"):
    groups = [
        dict(params=[p for p, g in zip(params, GROUP_OF) if g == k], **GROUPS[k]) for k in range(len(GROUPS))
    ]
    opt = DeepKDOptimizer(groups, lr=1.0, compat=compat, **{f"delta_{c}": d for c, d in DELTAS.items()})
    if block_bytes is not None:
        opt.cpu_block_bytes = block_bytes
    opt.sgd_kernel = kernel
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
    return opt, sched


def _run_optimizer(weights, grads_per_step, compat, via_grad_attr, block_bytes=None, kernels=("auto", "auto")):
    params = [torch.nn.Parameter(x.clone()) for x in weights]
    # optimizer.params is group order; map it back to the SHAPES index
    order = [i for k in range(len(GROUPS)) for i in range(len(SHAPES)) if GROUP_OF[i] == k]
    opt, sched = _build(params, compat, block_bytes, kernels[0])
    rng = random.Random(0)
    for step, grads in enumerate(grads_per_step):
        if step == SAVE_AT:  # checkpoint round trip into fresh objects, as a resumed run would do
            blob = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, blob)
            blob.seek(0)
            saved = torch.load(blob, weights_only=True)
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt, sched = _build(params, compat, block_bytes, kernels[1])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
        components = ["tog", "tcg", "ncg"]
        rng.shuffle(components)
        for c in components:
            if via_grad_attr:
                for i, p in enumerate(params):
                    p.grad = grads[c][i].clone() if i in grads[c] else None
                opt.fold(c)
                assert all(p.grad is None for p in params)
            else:
                opt.fold(c, [grads[c].get(i) for i in order])
        opt.step()
        sched.step()
    return params, opt


@pytest.mark.parametrize(
    "compat, via_grad_attr, block_bytes, kernels",
    [
        ("paper", True, None, ("auto", "auto")),  # torch's SGD kernels (fused here, foreach for the transposed one)
        ("paper", False, None, ("auto", "auto")),
        ("paper", True, None, ("foreach", "foreach")),
        ("paper", True, None, ("for-loop", "for-loop")),
        ("paper", True, None, ("own", "own")),  # our own foreach update (scaled buffers)
        ("paper", True, 40, ("own", "own")),  # tiny CPU cache blocks: tensors are grouped and cut into flat views
        # a checkpoint of our own update (buffers stored scaled, as every checkpoint before torch's kernels
        # was) resumed on torch's kernels, and the other way round
        ("paper", True, None, ("own", "auto")),
        ("paper", False, None, ("auto", "own")),
        ("official", True, None, ("auto", "auto")),
        ("official", False, None, ("auto", "auto")),
    ],
)
def test_trajectory_matches_reference_loop(compat, via_grad_attr, block_bytes, kernels):
    weights = _init_weights()
    assert not weights[0].is_contiguous()
    grads = _make_grads(seed=1)
    reference = reference_paper if compat == "paper" else reference_official
    ref_w, ref_m = reference(weights, grads)
    params, opt = _run_optimizer(weights, grads, compat, via_grad_attr, block_bytes, kernels)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), ref_w[i], rtol=1e-10, atol=1e-12)
    for (i, c), buf in ref_m.items():
        torch.testing.assert_close(opt.momentum_buffer(params[i], c), buf, rtol=1e-10, atol=1e-12)
    # a buffer that never got a gradient does not exist
    assert opt.momentum_buffer(params[1], "tcg") is None
    assert opt.momentum_buffer(params[3], "tog") is None


def test_paper_and_official_differ():
    """The two modes are different updates on this scenario (so the parity tests mean something)."""
    weights, grads = _init_weights(), _make_grads(seed=1)
    a, _ = _run_optimizer(weights, grads, "paper", True)
    b, _ = _run_optimizer(weights, grads, "official", True)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-3


def test_untouched_buffer_when_component_missing():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    opt = DeepKDOptimizer([p, q], lr=0.1)
    opt.fold("ncg", [torch.ones(3), torch.ones(3)])
    opt.step()
    before = opt.momentum_buffer(q, "ncg").clone()
    q_before = q.detach().clone()
    opt.fold("ncg", [torch.ones(3), None])
    opt.step()
    torch.testing.assert_close(opt.momentum_buffer(q, "ncg"), before, rtol=0, atol=0)
    torch.testing.assert_close(q.detach(), q_before, rtol=0, atol=0)
    # p: m = 0.95 * 1 + 1 = 1.95 in the second step
    torch.testing.assert_close(opt.momentum_buffer(p, "ncg"), torch.full((3,), 1.95))


def test_state_dict_round_trips_buffers_and_first_step_flags():
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = DeepKDOptimizer(params, lr=0.1, weight_decay=1e-3)
    opt.fold("tog", [torch.randn(4) for _ in params])
    opt.fold("tcg", [torch.randn(4), None, torch.randn(4)])
    opt.step()
    state = opt.state_dict()
    other = DeepKDOptimizer(params, lr=0.1, weight_decay=1e-3)
    other.load_state_dict(state)
    for p in params:
        for c in ("tog", "tcg", "ncg"):
            a, b = opt.momentum_buffer(p, c), other.momentum_buffer(p, c)
            assert (a is None) == (b is None), (c, a, b)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert other.momentum_buffer(params[1], "tcg") is None  # still "first fold next time"
    # the next fold of a never-folded buffer is a copy of the gradient
    g = torch.randn(4)
    other.fold("tcg", [None, g, None])
    other.step()
    torch.testing.assert_close(other.momentum_buffer(params[1], "tcg"), g)


def test_checkpoint_loads_across_modes():
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    paper = DeepKDOptimizer(params, lr=0.1)
    for c in ("tog", "tcg", "ncg"):
        paper.fold(c, [torch.randn(5) for _ in params])
    paper.step()
    official = DeepKDOptimizer(params, lr=0.1, compat="official")
    official.load_state_dict(paper.state_dict())
    for p in params:
        for c in ("tog", "tcg", "ncg"):
            torch.testing.assert_close(official.momentum_buffer(p, c), paper.momentum_buffer(p, c))


def test_changed_momentum_takes_effect():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DeepKDOptimizer([p], lr=1.0)
    opt.fold("tcg", [torch.ones(2)])
    opt.step()
    opt.param_groups[0]["momentum"] = 0.5  # mu_tcg becomes 0.425
    opt.fold("tcg", [torch.ones(2)])
    opt.step()
    torch.testing.assert_close(opt.momentum_buffer(p, "tcg"), torch.full((2,), 1.425))
    torch.testing.assert_close(p.detach(), torch.full((2,), -2.425))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=0.95, delta_tog=0.075),  # 1.025
        dict(momentum=0.925, delta_tog=0.075),  # exactly 1
        dict(momentum=0.05, delta_tcg=-0.075),  # negative
        dict(momentum=0.9, delta_ncg=0.2),
    ],
)
def test_momentum_outside_unit_interval_is_refused(kwargs):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DeepKDOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.1, **kwargs)


def test_bad_param_group_and_dot_momenta_refused():
    opt = DeepKDOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "momentum": 0.99})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DOTOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.95, delta=0.075)


def test_fold_misuse_errors():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DeepKDOptimizer([p], lr=0.1)
    with pytest.raises(ValueError, match="unknown gradient component"):
        opt.fold("kd", [torch.ones(2)])
    with pytest.raises(ValueError, match="1 parameters"):
        opt.fold("tog", [torch.ones(2), torch.ones(2)])
    opt.fold("tog", [torch.ones(2)])
    with pytest.raises(RuntimeError, match="already folded"):
        opt.fold("tog", [torch.ones(2)])
    with pytest.raises(RuntimeError, match="between fold"):
        opt.state_dict()
    with pytest.raises(ValueError, match="compat"):
        DeepKDOptimizer([p], lr=0.1, compat="reference")


def test_dot_matches_two_buffer_reference():
    gen = torch.Generator().manual_seed(3)
    w0 = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    mu, delta, lr, wd = 0.9, 0.075, 0.05, 5e-4
    params = [torch.nn.Parameter(x.clone()) for x in w0]
    opt = DOTOptimizer(params, lr=lr, momentum=mu, delta=delta, weight_decay=wd)
    ref_w = [x.clone() for x in w0]
    ref_task, ref_kd = [None, None], [None, None]
    for _ in range(5):
        task = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in w0]
        tcg = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in w0]
        ncg = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in w0]
        for i in range(2):
            gt = task[i] + wd * ref_w[i]
            gk = tcg[i] + ncg[i]
            ref_task[i] = gt.clone() if ref_task[i] is None else (mu - delta) * ref_task[i] + gt
            ref_kd[i] = gk.clone() if ref_kd[i] is None else (mu + delta) * ref_kd[i] + gk
            ref_w[i] = ref_w[i] - lr * (ref_task[i] + ref_kd[i])
        # drive the optimizer through component_losses, as the trainer does: losses linear in w
        losses = opt.component_losses(
            tog=sum((t * p).sum() for t, p in zip(task, params)),
            tcg=sum((t * p).sum() for t, p in zip(tcg, params)),
            ncg=sum((t * p).sum() for t, p in zip(ncg, params)),
        )
        assert set(losses) == {"task", "kd"}
        for name, loss in losses.items():
            loss.backward()
            opt.fold(name)
        opt.step()
    for p, r in zip(params, ref_w):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)


def test_component_losses_mapping():
    opt = DeepKDOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    a, b = torch.tensor(1.0), torch.tensor(2.0)
    assert opt.component_losses(tog=a, ncg=b) == {"tog": a, "ncg": b}
    dot = DOTOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    out = dot.component_losses(tog=a, tcg=b, ncg=b)
    assert out["task"] is a and out["kd"].item() == 4.0


def test_float32_matches_torch_sgd_when_components_share_momentum():
    """Sanity check against torch itself: one component with mu_tog = 0.9 is torch SGD."""
    torch.manual_seed(0)
    w = torch.randn(10, 5)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = DeepKDOptimizer([a], lr=0.1, momentum=0.825, weight_decay=1e-2, dampening=0.2)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.2)
    for _ in range(8):
        g = torch.randn(10, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.fold("tog")
        ours.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_fold_param_matches_fold_and_refuses_misuse():
    gen = torch.Generator().manual_seed(5)
    w0 = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)]
    by_list = [torch.nn.Parameter(x.clone()) for x in w0]
    by_param = [torch.nn.Parameter(x.clone()) for x in w0]
    a = DeepKDOptimizer([{"params": by_list[:1]}, {"params": by_list[1:], "lr": 0.2}], lr=0.1, weight_decay=0.01)
    b = DeepKDOptimizer([{"params": by_param[:1]}, {"params": by_param[1:], "lr": 0.2}], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        for c in ("ncg", "tog", "tcg"):
            grads = [torch.randn(x.shape, generator=gen) for x in w0]
            grads[1] = None if c == "tcg" else grads[1]
            a.fold(c, grads)
            for p, g in zip(by_param, grads):
                b.fold_param(c, p, g)
        a.step()
        b.step()
    for p, q in zip(by_list, by_param):
        torch.testing.assert_close(p, q)
    b.fold_param("tog", by_param[0], torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="twice"):
        b.fold_param("tog", by_param[0], torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="already folded"):
        b.fold("tog", [None, None])
    with pytest.raises(ValueError, match="not a parameter"):
        b.fold_param("tcg", torch.nn.Parameter(torch.zeros(1)), torch.ones(1))
