#!/usr/bin/env python
"""Two gloo workers: bytes all-reduced per step and step time of DeepKD's two distributed modes vs plain DKD under DDP.

    python bench/bench_dist.py [--quick] [--tasks cls,det] [--steps 4] [--warmup 1]

Per task, three cases on two CPU processes (gloo, one thread each), each worker on its own
random batch, the same in every case:

  <task>/dkd_ddp              plain DKD: one backward of the summed loss, DistributedDataParallel,
                              torch SGD (the baseline: DDP all-reduces one gradient set per step)
  <task>/deepkd_update        DeepKD-DKD, DEEPKD.DIST_MODE update: each worker folds its own
                              gradients, one all-reduce of the update sum_c m_c per step
  <task>/deepkd_components    DeepKD-DKD, DEEPKD.DIST_MODE components: one all-reduce per component

Tasks: ``cls`` the CIFAR ResNet8x4 student (teacher ResNet32x4, batch 32 per worker, 32x32), ``det``
the R-18-FPN Faster R-CNN student of configs/DEEPKD/Base-R18-R101.yaml (teacher R-101, 128 px,
one image per worker, 64 proposals). Bytes: the payload of every ``torch.distributed.all_reduce``
(the decoupled step's collectives, presence flags included) and of DDP's buckets (a comm hook),
per step, as seen by rank 0. One JSON object per case, ``{"case", "value", "unit", "baseline",
"ratio", ...}`` with the step time ratio against dkd_ddp and ``bytes_ratio`` likewise.
``--quick``: the cls task only, 2 timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from deepkd_det.core.dist import free_port

CASES = ("dkd_ddp", "deepkd_update", "deepkd_components")


class _Counter:
    """Counts the bytes and calls of torch.distributed.all_reduce (patched) and of DDP buckets."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._orig = dist.all_reduce

        self._in_hook = False

        def counted(tensor, *args, **kwargs):
            if not self._in_hook:  # DDP's hook below counts its bucket itself
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        self.bytes += buf.numel() * buf.element_size()
        self.calls += 1
        self._in_hook = True
        try:
            return allreduce_hook(state, bucket)
        finally:
            self._in_hook = False


def _cls_step(case: str, rank: int, counter: _Counter):
    from torch.nn.parallel import DistributedDataParallel

    from deepkd_det.cls.models import build_model
    from deepkd_det.core.losses import dkd_components
    from deepkd_det.core.optim import DeepKDOptimizer
    from deepkd_det.core.step import DecoupledStep

    torch.manual_seed(0)
    student, teacher = build_model("resnet8x4", 100), build_model("resnet32x4", 100).eval()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 100, (32,), generator=g)

    def losses(model):
        with torch.no_grad():
            zt = teacher(x)
        zs = model(x)
        zs = zs[0] if isinstance(zs, tuple) else zs
        zt = zt[0] if isinstance(zt, tuple) else zt
        tcg, ncg = dkd_components(zs, zt, y, 1.0, 8.0, 4.0)
        return F.cross_entropy(zs, y), tcg, ncg

    if case == "dkd_ddp":
        model = DistributedDataParallel(student, device_ids=None, broadcast_buffers=False)
        model.register_comm_hook(None, counter.ddp_hook)
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            sum(losses(model)).backward()
            opt.step()
        return step
    opt = DeepKDOptimizer(student.parameters(), lr=0.01, weight_decay=5e-4)
    decoupled = DecoupledStep(opt, "sequential", dist_mode=case.split("_")[1])

    def step():
        tog, tcg, ncg = losses(student)
        decoupled(opt.component_losses(tog=tog, tcg=tcg, ncg=ncg))
        opt.step()
    return step


def _det_step(case: str, rank: int, counter: _Counter):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_det_pairs as pairs

    from deepkd_det.det.engine.steps import CheckedSimpleTrainer
    from deepkd_det.det.engine.trainer import wrap_ddp

    opts = pairs.METHODS["dkd_plain" if case == "dkd_ddp" else "deepkd_dkd"] + [
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "DEEPKD.MERGE_EQUAL_MOMENTA", False]
    if case != "dkd_ddp":
        opts += ["DEEPKD.DIST_MODE", case.split("_")[1]]
    cfg = pairs.pair_cfg("R18-R101", opts + ["OUTPUT_DIR", tempfile.mkdtemp(prefix="bench_dist_")], 128, 1, "cpu")
    batch = pairs.make_batch(128, 1, 80, "cpu")
    torch.manual_seed(rank)  # each worker its own boxes and image
    batch[0]["image"] = torch.randint(0, 256, batch[0]["image"].shape).float()
    if case == "dkd_ddp":
        from deepkd_det.det.engine import DeepKDTrainer

        model = DeepKDTrainer.build_model(cfg)
        optimizer = DeepKDTrainer.build_optimizer(cfg, model)
        ddp = wrap_ddp(model)
        ddp.register_comm_hook(None, counter.ddp_hook)
        trainer = CheckedSimpleTrainer(ddp, pairs._Repeat(batch), optimizer)
    else:
        trainer = pairs.build_step(cfg, batch)
    from detectron2.utils.events import EventStorage

    storage = EventStorage(0)
    storage.__enter__()
    trainer.storage = storage
    state = {"i": 0}

    def step():
        trainer.iter = storage.iter = state["i"]
        trainer.run_step()
        state["i"] += 1
    return step


def _worker(rank, port, out_dir, tasks, warmup, steps):
    import logging

    for name in ("detectron2", "fvcore", "deepkd_det"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(minutes=10))
    counter = _Counter()
    results: Dict[str, Dict] = {}
    try:
        for task in tasks:
            for case in CASES:
                step = (_cls_step if task == "cls" else _det_step)(case, rank, counter)
                for _ in range(warmup):
                    step()
                times: List[float] = []
                counter.bytes = counter.calls = 0
                for _ in range(steps):
                    dist.barrier()
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                results[f"{task}/{case}"] = {"step": statistics.median(times), "bytes": counter.bytes / steps,
                                             "calls": counter.calls / steps}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="cls only, 2 timed steps")
    parser.add_argument("--tasks", default="cls,det")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.steps = "cls", 2
    tasks = [t for t in args.tasks.split(",") if t]
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        mp.spawn(_worker, args=(free_port(), tmp, tasks, args.warmup, args.steps), nprocs=2, join=True)
        res = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
    for task in tasks:
        base = res[f"{task}/dkd_ddp"]
        for case in CASES:
            r = res[f"{task}/{case}"]
            row = {"case": f"{task}/{case}", "value": round(r["step"], 5), "unit": "s/step",
                   "baseline": f"{task}/dkd_ddp", "ratio": round(r["step"] / base["step"], 4),
                   "bytes_per_step": int(r["bytes"]), "bytes_ratio": round(r["bytes"] / base["bytes"], 4),
                   "allreduce_calls_per_step": r["calls"], "workers": 2, "backend": "gloo"}
            if case == "deepkd_update":
                row["goal"] = "bytes_ratio ~1 (one all-reduce of the update, as DDP)"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
