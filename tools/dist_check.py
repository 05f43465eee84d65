#!/usr/bin/env python
"""A multi-process check of DeepKD's distributed modes, run under torchrun (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node 2 tools/dist_check.py [--device cuda|cpu] [--steps 10]

Every worker trains the CIFAR ResNet8x4 student (teacher ResNet32x4, both random) with DeepKD-DKD
on its own batches, once with DEEPKD.DIST_MODE update and once with components, and checks:
the teacher and student sit on this worker's device (cuda:LOCAL_RANK); the weights are equal on
every worker; the two modes give the same weights and the update mode's averaged buffers equal
the components mode's buffers (relative 1e-9: the run is in float64, since float32 rounding
differences grow quickly in a randomly initialised BN network). Prints one JSON line per worker; exits 1
on a failed check.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepkd_det.cls.models import build_model
from deepkd_det.core.dist import init_distributed
from deepkd_det.core.losses import dkd_components
from deepkd_det.core.optim import DeepKDOptimizer
from deepkd_det.core.step import DecoupledStep, broadcast_parameters


def train(mode: str, device: torch.device, rank: int, steps: int):
    torch.manual_seed(0)
    student = build_model("resnet8x4", 100).to(device).double()
    teacher = build_model("resnet32x4", 100).to(device).double().eval().requires_grad_(False)
    broadcast_parameters(student)
    opt = DeepKDOptimizer(student.parameters(), lr=0.01, weight_decay=5e-4)
    step = DecoupledStep(opt, "sequential", dist_mode=mode)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64).to(device)
        y = torch.randint(0, 100, (16,), generator=gen).to(device)
        with torch.no_grad():
            zt = teacher(x)
        zs = student(x)
        zs, zt = (z[0] if isinstance(z, tuple) else z for z in (zs, zt))
        tcg, ncg = dkd_components(zs, zt, y, 1.0, 8.0, 4.0)
        step(opt.component_losses(tog=F.cross_entropy(zs, y), tcg=tcg, ncg=ncg))
        opt.step()
    opt.average_buffers_()
    devices = {str(p.device) for p in list(student.parameters()) + list(teacher.parameters())}
    buffers = [opt.momentum_buffer(p, c) for p in opt.params for c in opt.components]
    return [p.detach().clone() for p in student.parameters()], buffers, devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    info = init_distributed(args.device)
    failures = []
    try:
        expected = f"cuda:{info.local_rank}" if info.device.type == "cuda" else "cpu"
        runs = {mode: train(mode, info.device, info.rank, args.steps) for mode in ("update", "components")}
        for mode, (weights, _, devices) in runs.items():
            if devices != {expected}:
                failures.append(f"{mode}: model on {sorted(devices)}, expected {expected}")
            flat = torch.cat([w.reshape(-1) for w in weights])
            gathered = [torch.zeros_like(flat) for _ in range(info.world)]
            dist.all_gather(gathered, flat)
            if any(not torch.equal(g, gathered[0]) for g in gathered):
                failures.append(f"{mode}: workers hold different weights")
        def rel(xs, ys):  # largest difference relative to the tensor's largest magnitude
            return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                       for a, b in zip(xs, ys) if a is not None)

        w_diff, b_diff = rel(runs["update"][0], runs["components"][0]), rel(runs["update"][1], runs["components"][1])
        if w_diff > 1e-9 or b_diff > 1e-9:
            failures.append(f"update vs components: weights differ by {w_diff:.3g}, buffers by {b_diff:.3g}")
        print(json.dumps({"case": "dist_check", "rank": info.rank, "world": info.world, "device": str(info.device),
                          "backend": dist.get_backend(), "max_rel_weight_diff_update_vs_components": w_diff,
                          "max_rel_buffer_diff_update_vs_components": b_diff,
                          "status": "failed" if failures else "passed", "failures": failures}), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
