#!/usr/bin/env python
"""Evaluate a classification checkpoint (top-1 / top-5 on the config's validation set).

    python tools/eval_cls.py --cfg configs/cls/digits/dkd.yaml --ckpt output/cls/digits/.../student_best.pth

``--ckpt`` is any file with the student's weights: ``latest.pth``, ``best.pth``,
``student_best.pth``, ``ckpt_epoch_<N>.pth`` or a plain state dict. ``--teacher`` evaluates the
config's teacher (``TEACHER.CKPT`` or ``TEACHER.ROOT``) instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from deepkd_det.cls.config import ConfigError, load_cfg
from deepkd_det.cls.data import build_datasets, build_loaders
from deepkd_det.cls.engine import build_teacher, evaluate
from deepkd_det.cls.models import build_model, load_teacher_weights
from deepkd_det.core.dist import init_distributed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--ckpt", help="student checkpoint to evaluate")
    parser.add_argument("--teacher", action="store_true", help="evaluate the config's teacher instead")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if bool(args.ckpt) == bool(args.teacher):
        parser.error("give exactly one of --ckpt PATH or --teacher")
    try:
        cfg = load_cfg(args.cfg, args.opts)
        info = init_distributed(cfg.DEVICE)
        train_set, val_set, num_classes = build_datasets(cfg)
        _, val_loader = build_loaders(cfg, train_set, val_set, info.rank, info.world)
        if args.teacher:
            model = build_teacher(cfg, num_classes)
            name = cfg.DISTILLER.TEACHER
        else:
            name = cfg.DISTILLER.STUDENT
            model = load_teacher_weights(build_model(name, num_classes), args.ckpt)  # strict load
        result = evaluate(model.to(info.device), val_loader, info.device)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"eval_cls.py: error: {exc}", file=sys.stderr)
        return 1
    if info.is_main:
        print(json.dumps({"model": name, "ckpt": args.ckpt or "teacher", **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
