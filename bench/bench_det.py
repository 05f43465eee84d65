#!/usr/bin/env python
"""Iteration time of the detection training step on CPU: plain student, plain DKD, DeepKD-DKD.

    python bench/bench_det.py [--quick] [--size 128] [--batch 4] [--repeats 12] [--threads N]

All cases train the same R-18-FPN Faster R-CNN student (configs/DEEPKD/demo) on the same
generated shapes images, in one process: ``student_plain`` (KD.TYPE NONE, torch SGD on the sum of
the losses), ``dkd_plain`` (a frozen R-18-FPN teacher's box head on the student's proposals, DKD
added to the sum), ``deepkd_dkd`` (the same losses, the decoupled three-buffer step; both
gradient strategies of deepkd_det.core.step), ``dkd_diffkd`` (plain DKD plus DiffKD on the FPN
levels p2..p6 and the box-regression KD). Each case: warm-up steps, then ``--repeats``
timed steps, median. The teacher's share is the time spent in the teacher (backbone + box head
under no_grad) divided by the iteration time. One JSON object per line:
``{"case", "value", "unit", "baseline", "ratio"}`` (ratio = value / baseline's value).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Dict, List, Optional

import torch

# The same step timer and JSON row as the paper-pair benchmark (this folder is on sys.path when a
# bench script runs).
from bench_det_pairs import emit, time_steps
from detectron2.config import get_cfg
from detectron2.utils.env import seed_all_rng

import deepkd_det.det.modeling  # noqa: F401  (registers DeepKDRCNN)
from deepkd_det.det.config import add_deepkd_config
from deepkd_det.det.data import add_data_config, generate_shapes_dataset
from deepkd_det.det.engine import DeepKDTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO = os.path.join(REPO, "configs", "DEEPKD", "demo")
CASES = [
    ("student_plain", "student-vanilla.yaml", []),
    ("dkd_plain", "student-dkd.yaml", []),
    ("deepkd_dkd", "student-deepkd-dkd.yaml", ["DEEPKD.GRAD_STRATEGY", "sequential"]),
    ("deepkd_dkd_batched", "student-deepkd-dkd.yaml", ["DEEPKD.GRAD_STRATEGY", "batched"]),
    # DiffKD with the paper's detection setting (p2..p6, KD loss 5, 5 DDIM steps, regression KD)
    # on top of plain DKD: its cost per iteration relative to dkd_plain.
    # The random teacher's (eval-mode, unit-statistics BN) maps are huge, so the from-scratch
    # student would diverge within the timed steps at the demo lr; the lr does not change the cost.
    ("dkd_diffkd", "student-dkd.yaml", ["KD.DIFFKD.ENABLED", "True", "SOLVER.BASE_LR", "1e-6",
                                        "KD.DIFFKD.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p6']"]),
]


def build_trainer(config: str, out_dir: str, data_root: str, size: int, batch: int, num_train: int, opts: List[str]):
    cfg = add_data_config(add_deepkd_config(get_cfg()))
    cfg.merge_from_file(os.path.join(DEMO, config))
    cfg.merge_from_list(opts)
    cfg.OUTPUT_DIR = out_dir
    cfg.DATASETS.SHAPES.ROOT, cfg.DATASETS.SHAPES.IMAGE_SIZE = data_root, size
    cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL = num_train, 2
    cfg.DATASETS.TEST = ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.TEACHER.MODEL.WEIGHTS = ""
    cfg.TEACHER.ALLOW_RANDOM_INIT = True  # timing only: the teacher's weights do not matter
    cfg.freeze()
    seed_all_rng(0)
    return DeepKDTrainer(cfg)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 px, batch 2, 3 timed steps")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.warmup, args.repeats = 64, 2, 1, 3
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    for name in ("detectron2", "fvcore", "deepkd_det"):  # quiet: only the JSON lines on stdout
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)  # "configured": the trainer then adds no console handler
        logger.addHandler(logging.NullHandler())
        logger.propagate = False

    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_det_") as tmp:
        data_root = os.path.join(tmp, "data")
        num_train = max(16, args.batch * 4)
        generate_shapes_dataset(data_root, num_train, 2, args.size, seed=0)
        for case, config, opts in CASES:
            trainer = build_trainer(config, os.path.join(tmp, case), data_root, args.size, args.batch, num_train, opts)
            results[case] = time_steps(trainer, args.warmup, args.repeats, "cpu")
            del trainer

    base = results["student_plain"]["step"]
    emit("student_plain", base, "s/iter", "student_plain", base)
    emit("dkd_plain", results["dkd_plain"]["step"], "s/iter", "student_plain", base)
    for case in ("deepkd_dkd", "deepkd_dkd_batched"):
        emit(case, results[case]["step"], "s/iter", "dkd_plain", results["dkd_plain"]["step"])
    emit("dkd_diffkd", results["dkd_diffkd"]["step"], "s/iter", "dkd_plain", results["dkd_plain"]["step"])
    emit("deepkd_dkd_batched_vs_sequential", results["deepkd_dkd_batched"]["step"], "s/iter", "deepkd_dkd",
         results["deepkd_dkd"]["step"])
    for case in ("dkd_plain", "deepkd_dkd", "dkd_diffkd"):
        emit(f"{case}_teacher_share", results[case]["teacher_share"], "fraction of the iteration", None, None)


if __name__ == "__main__":
    main()
