#!/usr/bin/env python
"""DeepKD-Det detection training and evaluation (detectron2 projects style).

    python train_net.py --config-file configs/DEEPKD/DKD-R18-R101.yaml --num-gpus 8
    python train_net.py --config-file configs/DEEPKD/demo/student-deepkd-dkd.yaml --resume
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python -m torch.distributed.run --nproc_per_node 2 train_net.py --config-file ...   # CPU: gloo

Trailing ``KEY VALUE`` pairs override the config (e.g. ``DEEPKD.ENABLED False``,
``KD.TYPE NONE`` to train an ordinary detector, e.g. your own teacher). ``--resume``,
``--eval-only`` and ``--debug`` may also follow them.

Configuration and input errors (unknown key, bad value, missing or unreadable file, class
count that differs from the dataset, a diverged run) end with one line on stderr and exit code
1; ``--debug`` or ``DEEPKD_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import deepkd_det.det.modeling  # noqa: F401  (registers DeepKDRCNN and the MobileNetV2 backbones)
from deepkd_det.cli import format_error, pull_trailing_flags
from deepkd_det.core.io import check_output_dir
from deepkd_det.det.config import (
    add_deepkd_config,
    check_input_files,
    lr_batch_warning,
    merge_config_file,
    student_only_cfg,
    validate_deepkd_config,
)
from deepkd_det.det.data import (
    add_data_config,
    check_mask_annotations,
    check_num_classes,
    check_training_annotations,
    needs_class_count,
    register_datasets_from_cfg,
    resolve_num_classes,
)
from deepkd_det.det.engine import DeepKDTrainer
from deepkd_det.det.engine.launch import parse_entry_args, run_entry_point
from deepkd_det.det.weights.checkpoint import EvalCheckpointer, load_named

# Errors a user can act on: printed as one line by the command line (never internal bugs'
# AssertionErrors; those from the config merge are turned into ValueError first).

logger = logging.getLogger("deepkd_det")


def _merge(cfg, args):
    """The config file, then the overrides; yacs' AssertionError / KeyError become one line naming
    the key and where it came from. Returns the file's (IMS_PER_BATCH, BASE_LR)."""
    if args.config_file:
        if not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist")
        try:
            merge_config_file(cfg, args.config_file)
        except (AssertionError, KeyError) as exc:
            raise ValueError(f"{args.config_file}: {format_error(exc)}") from None
    file_batch = (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR)
    try:
        cfg.merge_from_list(args.opts)
    except (AssertionError, KeyError) as exc:
        raise ValueError(f"command line: {format_error(exc)}") from None
    return file_batch


def setup(args):
    """The frozen config of ``args`` (file, then trailing KEY VALUE opts), validated, plus
    detectron2's default setup (logger, output dir, config dump, seeds).

    Everything that can be checked before a model is built is checked here, before anything is
    written to OUTPUT_DIR: keys and values, datasets (json, images, boxes, class count), weight
    files. A class count of 0 (``MODEL.ROI_HEADS.NUM_CLASSES``, ``MODEL.RETINANET.NUM_CLASSES``, the
    teacher's) takes the class count from the dataset json.
    """
    cfg = get_cfg()
    add_deepkd_config(cfg)
    add_data_config(cfg)
    opts, late = pull_trailing_flags(args.opts or [], ("--resume", "--eval-only", "--debug"))
    args.opts = opts
    for flag in late:
        setattr(args, flag[2:].replace("-", "_"), True)
    batch_note = lr_batch_warning(cfg, *_merge(cfg, args))
    no_cuda = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if no_cuda:  # the same command runs on a CPU machine
        cfg.MODEL.DEVICE = "cpu"
    if needs_class_count(cfg):
        register_datasets_from_cfg(cfg)  # a class count (NUM_CLASSES 0) comes from the dataset json
        resolve_num_classes(cfg)
    validate_deepkd_config(cfg)
    check_input_files(cfg, resume=args.resume, eval_only=args.eval_only)
    register_datasets_from_cfg(cfg)
    names = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    check_num_classes(cfg, names)
    check_mask_annotations(cfg, names)
    if not args.eval_only:
        check_training_annotations(cfg.DATASETS.TRAIN)
    check_output_dir(cfg.OUTPUT_DIR)
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2's logger setup covers "detectron2" and "fvcore"; ours log under "deepkd_det".
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deepkd_det")
    if no_cuda:
        logger.warning("no CUDA device: running on the CPU (MODEL.DEVICE cpu)")
    if batch_note:
        logger.warning(batch_note)
    return cfg


def format_bbox_ap(results) -> str:
    """One line per dataset: bbox AP / AP50 / AP75 from detectron2's result dict."""
    per_dataset = {"": results} if "bbox" in results else results
    lines = []
    for name, res in per_dataset.items():
        box = res.get("bbox", {})
        label = f"{name} " if name else ""
        lines.append(
            f"{label}bbox AP {box.get('AP', float('nan')):.2f}  AP50 {box.get('AP50', float('nan')):.2f}  "
            f"AP75 {box.get('AP75', float('nan')):.2f}"
        )
    return "\n".join(lines)


def evaluate(cfg, resume: bool = False):
    """Load MODEL.WEIGHTS (or the last checkpoint with ``resume``) into the student and evaluate
    it on DATASETS.TEST with COCOEvaluator."""
    cfg = student_only_cfg(cfg)
    if not cfg.DATASETS.TEST:
        raise ValueError("--eval-only needs at least one dataset in DATASETS.TEST")
    register_datasets_from_cfg(cfg)
    model = DeepKDTrainer.build_model(cfg)
    checkpointer = EvalCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    load_checkpoint(lambda: checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume), cfg, resume)
    results = DeepKDTrainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
        print(format_bbox_ap(results), flush=True)
    return results


def load_checkpoint(load, cfg, resume: bool):
    """``load()`` (a checkpointer's resume_or_load), with a missing or damaged file named as the
    config key (MODEL.WEIGHTS) or the ``last_checkpoint`` entry it came from."""
    return load_named(load, cfg.OUTPUT_DIR, resume, "MODEL.WEIGHTS")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg, resume=args.resume)
    trainer = DeepKDTrainer(cfg)
    load_checkpoint(lambda: trainer.resume_or_load(resume=args.resume), cfg, args.resume)
    return trainer.train()


def parse_args(argv=None):
    return parse_entry_args(argv)


def cli(argv=None) -> int:
    return run_entry_point(main, "train_net.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
