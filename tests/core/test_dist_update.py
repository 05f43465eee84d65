"""The distributed "update" mode (each worker folds its own gradients, one all-reduce of sum_c m_c
per step) equals the per-component mode and one process on the union batch: two gloo workers,
20 steps, DeepKD-DKD (three buffers), DeepKD-KD (TOG and NCG in one buffer), DOT, with the
"sequential" and "batched" gradient strategies; parameters that
a component reaches only on some workers and steps; an fp16-style overflow step; a resume from
buffers averaged over the two workers."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.amp import ComponentGradScaler
from deepkd_det.core.dist import free_port
from deepkd_det.core.losses import dkd_components
from deepkd_det.core.optim import DeepKDOptimizer, DOTOptimizer
from deepkd_det.core.step import DecoupledStep

pytestmark = pytest.mark.dist

NUM_CLASSES, HALF, STEPS, RESUME_AT, OVERFLOW_AT = 5, 4, 20, 10, 7
CONFIGS = ("dkd", "kd_merged", "dot")


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, NUM_CLASSES)
        self.aux_tog = nn.Linear(width, 1)  # TOG, from rank 0's half, every third step
        self.aux_tcg = nn.Linear(width, NUM_CLASSES)  # TCG, from rank 1's half, odd steps
        self.aux_ncg = nn.Linear(width, NUM_CLASSES)  # NCG, from rank 1's half, even steps


class _Overflow(torch.autograd.Function):
    """Identity whose backward writes inf into the rows of ``mask`` (an fp16 overflow, injected)."""

    generate_vmap_rule = True  # the "batched" strategy differentiates it under vmap

    @staticmethod
    def forward(x, mask):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g.masked_fill(mask[:, None], float("inf")), None


def _models():
    torch.manual_seed(0)
    return Net(6).double(), Net(4).double().eval().requires_grad_(False)


def _data():
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, 2 * HALF, 3, 4, 4, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, NUM_CLASSES, (STEPS, 2 * HALF), generator=gen)
    return xs, ys


def _optimizer(config, params):
    if config == "dot":
        return DOTOptimizer(params, lr=0.1, weight_decay=1e-3, dampening=0.1)
    delta_ncg = 0.075 if config == "kd_merged" else 0.05
    return DeepKDOptimizer(params, lr=0.1, weight_decay=1e-3, delta_ncg=delta_ncg,
                           merge_equal_momenta=config == "kd_merged")


def _losses(student, teacher, x, y, step, rows):
    """Means over the samples ``rows``: the two workers' losses average to the union's loss."""
    n = len(y)
    half = torch.arange(rows.start, rows.stop) >= HALF  # True: rank 1's samples
    feat = F.adaptive_avg_pool2d(torch.tanh(student.conv(x)), 1).flatten(1)
    if step == OVERFLOW_AT:
        feat = _Overflow.apply(feat, half)  # rank 1's half overflows
    with torch.no_grad():
        zt = teacher.fc(F.adaptive_avg_pool2d(torch.tanh(teacher.conv(x)), 1).flatten(1))
    zs = student.fc(feat)
    tog = F.cross_entropy(zs, y, reduction="sum") / n
    if step % 3 == 0 and (~half).any():
        tog = tog + (student.aux_tog(feat[~half]) ** 2).sum() / n
    zs_tcg, zs_ncg = zs, zs
    if step % 2 == 1 and half.any():
        zs_tcg = zs + torch.where(half[:, None], student.aux_tcg(feat), torch.zeros_like(zs))
    if step % 2 == 0 and half.any():
        zs_ncg = zs + torch.where(half[:, None], student.aux_ncg(feat), torch.zeros_like(zs))
    tcg = dkd_components(zs_tcg, zt, y, 1.0, 2.0, 2.0)[0]
    ncg = dkd_components(zs_ncg, zt, y, 1.0, 2.0, 2.0)[1]
    return tog, tcg, ncg


def _train(config, mode, rows, first=0, last=STEPS, state=None, strategy="sequential"):
    """Steps ``first..last-1`` on the samples ``rows`` of each batch; returns weights, buffers, scaler."""
    student, teacher = _models()
    opt = _optimizer(config, student.parameters())
    scaler = ComponentGradScaler(init_scale=2.0**10, growth_interval=4)
    if state is not None:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
    step_fn = DecoupledStep(opt, strategy, scaler=scaler, dist_mode=mode)
    xs, ys = _data()
    skipped = []
    for k in range(first, last):
        tog, tcg, ncg = _losses(student, teacher, xs[k, rows], ys[k, rows], k, rows)
        step_fn(opt.component_losses(tog=tog, tcg=tcg, ncg=ncg))
        skipped.append(step_fn.skipped)
        opt.step()
    assert step_fn.strategy == strategy  # "batched" did not fall back to "sequential"
    opt.average_buffers_()  # collective; a no-op in one process
    return {"model": {k: v.clone() for k, v in student.state_dict().items()}, "opt": opt.state_dict(),
            "scaler": scaler.state_dict(), "skipped": skipped}


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        rows = slice(rank * HALF, (rank + 1) * HALF)
        out = {}
        for config in CONFIGS:
            for mode in ("update", "components"):
                out[config, mode] = _train(config, mode, rows)
            for mode in ("update", "components"):  # one vmapped backward for all components
                out[config, mode + "_batched"] = _train(config, mode, rows, strategy="batched")
            half = _train(config, "update", rows, last=RESUME_AT)
            out[config, "resumed"] = _train(config, "update", rows, first=RESUME_AT, state=half)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _buffers(opt_state):
    return {(i, k): v for i, s in opt_state["state"].items() for k, v in s.items() if k.startswith("scaled_")}


def test_update_mode_equals_component_mode_and_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    start = _models()[0].state_dict()
    for config in CONFIGS:
        single = _train(config, "update", slice(0, 2 * HALF))
        assert single["skipped"][OVERFLOW_AT] and sum(single["skipped"]) == 1
        for variant in ("update", "components", "update_batched", "components_batched", "resumed"):
            for rank in ranks:
                got = rank[config, variant]
                for name, w in single["model"].items():
                    torch.testing.assert_close(got["model"][name], w, rtol=0, atol=1e-9, msg=f"{config} {variant}")
                want = _buffers(single["opt"])
                assert set(_buffers(got["opt"])) == set(want)
                for key, buf in _buffers(got["opt"]).items():
                    scale = got["opt"]["state"][key[0]][key[1].replace("scaled_buffer_", "") + "_scale"]
                    scale_1 = single["opt"]["state"][key[0]][key[1].replace("scaled_buffer_", "") + "_scale"]
                    torch.testing.assert_close(buf / scale, want[key] / scale_1, rtol=0, atol=1e-9)
                if variant != "resumed":
                    assert got["skipped"] == single["skipped"]
        for name in ("aux_tog.weight", "aux_tcg.weight", "aux_ncg.weight"):  # partly reached: trained
            assert not torch.equal(single["model"][name], start[name])
