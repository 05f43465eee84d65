"""Two gloo workers on batches A and B end where one process on A+B ends (decoupled DeepKD steps)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from deepkd_det.core.dist import free_port
from deepkd_det.core.losses import dkd_components
from deepkd_det.core.optim import DeepKDOptimizer
from deepkd_det.core.step import STRATEGIES, DecoupledStep, broadcast_parameters

pytestmark = pytest.mark.dist

NUM_CLASSES = 7
HALF_BATCH = 6
NUM_STEPS = 3


class NoBNNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, NUM_CLASSES)
        self.aux = nn.Linear(width, 1)  # reached by the task loss only

    def forward(self, x):
        feat = F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1).flatten(1)
        return self.fc(feat), self.aux(feat)


def _models():
    torch.manual_seed(0)
    student = NoBNNet(5).double()
    teacher = NoBNNet(4).double().eval().requires_grad_(False)
    return student, teacher


def _data():
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(NUM_STEPS, 2 * HALF_BATCH, 3, 5, 5, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, NUM_CLASSES, (NUM_STEPS, 2 * HALF_BATCH), generator=gen)
    return xs, ys


def _train(student, teacher, xs, ys, strategy):
    opt = DeepKDOptimizer(student.parameters(), lr=0.2, weight_decay=1e-3)
    step = DecoupledStep(opt, strategy)
    for x, y in zip(xs, ys):
        with torch.no_grad():
            zt, _ = teacher(x)
        zs, aux = student(x)
        tcg, ncg = dkd_components(zs, zt, y, alpha=1.0, beta=2.0, temperature=2.0, topk=3)
        step(opt.component_losses(tog=F.cross_entropy(zs, y) + aux.pow(2).mean(), tcg=tcg, ncg=ncg))
        opt.step()
    return [p.detach().clone() for p in student.parameters()]


def _worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    try:
        xs, ys = _data()
        rows = slice(rank * HALF_BATCH, (rank + 1) * HALF_BATCH)
        results = {}
        for strategy in STRATEGIES:
            student, teacher = _models()
            if rank == 1:  # a different start on rank 1: broadcast_parameters must undo it
                with torch.no_grad():
                    for p in student.parameters():
                        p.add_(1.0)
            broadcast_parameters(student)
            results[strategy] = _train(student, teacher, xs[:, rows], ys[:, rows], strategy)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_match_one_process_on_the_union(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    xs, ys = _data()
    for strategy in STRATEGIES:
        student, teacher = _models()
        single = _train(student, teacher, xs, ys, strategy)
        start = [p.detach() for p in _models()[0].parameters()]
        for p, q0, q1, p0 in zip(single, ranks[0][strategy], ranks[1][strategy], start):
            torch.testing.assert_close(q0, q1, rtol=0, atol=0)
            torch.testing.assert_close(q0, p, rtol=1e-9, atol=1e-12)
            assert not torch.equal(p, p0)  # training moved every parameter
