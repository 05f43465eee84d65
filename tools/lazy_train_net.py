#!/usr/bin/env python
"""DeepKD-Det training and evaluation from a LazyConfig (detectron2's Python configs).

    python tools/lazy_train_net.py --config-file configs/DEEPKD/lazy/DKD-R18-R101.py --num-gpus 8
    python tools/lazy_train_net.py --config-file x.py train.max_iter=1000 deepkd.TOPK.K_START=2
    python tools/lazy_train_net.py --config-file x.py --resume
    python tools/lazy_train_net.py --config-file x.py --eval-only train.init_checkpoint=output/model_final.pth

The engine is train_net.py's (deepkd_det/det/engine: the decoupled DeepKD step, AMP, the
checkpointer and its teacher rule, exact --resume, the hooks and COCO evaluation); only the
builders read the LazyConfig: ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``,
``train`` (detectron2's configs/common layout), ``deepkd`` (the DEEPKD settings, same keys as
the yacs node) and ``datasets`` (DATASETS.REGISTER / SHAPES). Trailing ``key=value`` overrides
follow detectron2's (hydra's) syntax; an unknown key of a plain node is refused. See
docs/lazyconfig.md.

Configuration and input errors end with one line on stderr and exit code 1; ``--debug`` or
``DEEPKD_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import deepkd_det.det.modeling  # noqa: F401  (registers the project's detectors and backbones)
from deepkd_det.det.engine.launch import parse_entry_args, run_entry_point
from deepkd_det.det.lazy import (
    build_eval_model,
    check_lazy_files,
    cpu_fallback,
    load_lazy_config,
    register_lazy_datasets,
    validate_lazy_config,
)
from deepkd_det.det.weights.checkpoint import load_named

logger = logging.getLogger("deepkd_det")

_FLAGS = ("--resume", "--eval-only", "--debug")


def setup(args):
    """``(cfg, deepkd node, engine settings)`` of ``args``: the config file with its overrides,
    validated (keys, DEEPKD settings, datasets, weight files) before anything is written, then
    detectron2's default setup (logger, output dir, config.yaml, seed ``train.seed``)."""
    opts = []
    for token in args.opts or []:
        if token in _FLAGS:  # typed after the overrides
            setattr(args, token[2:].replace("-", "_"), True)
        else:
            opts.append(token)
    args.opts = opts
    where = args.config_file
    cfg = load_lazy_config(args.config_file, opts)
    no_cuda = cpu_fallback(cfg)
    deepkd, settings = validate_lazy_config(cfg, where, eval_only=args.eval_only)
    register_lazy_datasets(cfg, eval_only=args.eval_only)
    check_lazy_files(cfg, resume=args.resume, eval_only=args.eval_only)
    default_setup(cfg, args)
    setup_logger(output=settings.output_dir, distributed_rank=comm.get_rank(), name="deepkd_det")
    if no_cuda:
        logger.warning("no CUDA device: running on the CPU (train.device cpu)")
    return cfg, deepkd, settings


def evaluate(cfg, resume: bool = False):
    """The student (``model.student`` of a DistillDetector, else ``model``) with
    ``train.init_checkpoint`` (or the last checkpoint with ``resume``), evaluated on
    ``dataloader.test`` with ``dataloader.evaluator``."""
    from deepkd_det.det.engine.lazy import lazy_evaluate
    from deepkd_det.det.weights.checkpoint import EvalCheckpointer

    if cfg.dataloader.get("test") is None or cfg.dataloader.get("evaluator") is None:
        raise ValueError("--eval-only needs dataloader.test and dataloader.evaluator in the config")
    model = build_eval_model(cfg)
    checkpointer = EvalCheckpointer(model, save_dir=cfg.train.output_dir)
    load_named(lambda: checkpointer.resume_or_load(cfg.train.get("init_checkpoint", ""), resume=resume),
               cfg.train.output_dir, resume, "train.init_checkpoint")
    return lazy_evaluate(cfg, model)


def main(args):
    from deepkd_det.det.engine.lazy import LazyDeepKDTrainer

    cfg, deepkd, settings = setup(args)
    if args.eval_only:
        return evaluate(cfg, resume=args.resume)
    trainer = LazyDeepKDTrainer(cfg, deepkd, settings)
    load_named(lambda: trainer.resume_or_load(resume=args.resume), settings.output_dir, args.resume,
               "train.init_checkpoint")
    return trainer.train()


def parse_args(argv=None):
    return parse_entry_args(argv)


def cli(argv=None) -> int:
    return run_entry_point(main, "lazy_train_net.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
