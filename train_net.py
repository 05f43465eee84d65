#!/usr/bin/env python
"""DeepKD-Det detection training and evaluation (detectron2 projects style).

    python train_net.py --config-file configs/DEEPKD/DKD-R18-R101.yaml --num-gpus 8
    python train_net.py --config-file configs/DEEPKD/demo/student-deepkd-dkd.yaml --resume
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python -m torch.distributed.run --nproc_per_node 2 train_net.py --config-file ...   # CPU: gloo

Trailing ``KEY VALUE`` pairs override the config (e.g. ``DEEPKD.ENABLED False``,
``KD.TYPE NONE`` to train an ordinary detector, e.g. your own teacher).
"""

from __future__ import annotations

import logging

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import deepkd_det.det.modeling  # noqa: F401  (registers DeepKDRCNN and the MobileNetV2 backbones)
from deepkd_det.det.checkpoint import DeepKDCheckpointer
from deepkd_det.det.config import add_deepkd_config, validate_deepkd_config
from deepkd_det.det.data import add_data_config, register_datasets_from_cfg
from deepkd_det.det.engine import DeepKDTrainer, launch_main

logger = logging.getLogger("deepkd_det")


def setup(args):
    """The frozen config of ``args`` (file, then trailing KEY VALUE opts), validated, plus
    detectron2's default setup (logger, output dir, config dump, seeds)."""
    cfg = get_cfg()
    add_deepkd_config(cfg)
    add_data_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    validate_deepkd_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2's logger setup covers "detectron2" and "fvcore"; ours log under "deepkd_det".
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deepkd_det")
    return cfg


def student_only_cfg(cfg):
    """The config with distillation off: evaluation needs the student alone (no teacher weights)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.KD.TYPE = "NONE"
    cfg.DEEPKD.ENABLED = False
    cfg.freeze()
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
    DeepKDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    results = DeepKDTrainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
        print(format_bbox_ap(results), flush=True)
    return results


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg, resume=args.resume)
    trainer = DeepKDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_main(main, args)
