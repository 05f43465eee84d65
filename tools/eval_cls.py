#!/usr/bin/env python
"""Evaluate a classification checkpoint (top-1 / top-5 on the config's validation set).

    python tools/eval_cls.py --cfg configs/cls/digits/dkd.yaml --ckpt output/cls/digits/.../student_best.pth

``--ckpt`` is any file with the student's weights: ``latest.pth``, ``best.pth``,
``student_best.pth``, ``ckpt_epoch_<N>.pth`` or a plain state dict. ``--teacher`` evaluates the
config's teacher (``TEACHER.CKPT`` or ``TEACHER.ROOT``) instead.

GPD (``GPD.ENABLED`` in the config): a file holding the GPD shared model (``latest.pth``,
``best.pth``) is evaluated three ways: the shared model at student width, the plain student
exported from it (core.gpd.export, what ``student_best.pth`` holds) and the dynamic teacher;
the line also reports the largest logit difference between the first two (``max_logit_diff``)
and ``agree`` (below 1e-4 of the largest logit). A plain student file is evaluated as usual.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from deepkd_det.cli import DEBUG_ENV, debug_requested, format_error
from deepkd_det.cls.config import ConfigError, load_cfg
from deepkd_det.cls.data import build_datasets, build_loaders
from deepkd_det.cls.distillers.gpd import plain_student, widen_student
from deepkd_det.cls.engine import build_teacher, evaluate
from deepkd_det.cls.models import build_model, load_teacher_weights
from deepkd_det.cls.models.checkpoint import read_state_dict
from deepkd_det.core.dist import init_distributed
from deepkd_det.core.gpd import DYNAMIC_TEACHER, at_width

AGREE_RTOL = 1e-4


@torch.no_grad()
def logit_gap(a, b, loader, device):
    """(max |a(x) - b(x)|, max |b(x)|) over the loader (eval mode), maximised over the workers."""
    a.eval()
    b.eval()
    worst = torch.zeros(2, dtype=torch.float64)
    for image, _ in loader:
        image = image.to(device)
        za, zb = a(image), b(image)
        worst = torch.maximum(worst, torch.tensor([(za - zb).abs().max().item(), zb.abs().max().item()],
                                                  dtype=torch.float64))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return worst[0].item(), worst[1].item()


def evaluate_gpd(cfg, path, num_classes, val_loader, device):
    """The GPD shared model in ``path``: shared at student width, exported student, dynamic teacher."""
    shared = widen_student(cfg, build_model(cfg.DISTILLER.STUDENT, num_classes), check=False)
    shared.load_state_dict(read_state_dict(path))  # strict
    shared.to(device)
    exported = plain_student(shared)
    result = {"shared_student": evaluate(shared, val_loader, device), "exported": evaluate(exported, val_loader, device)}
    with at_width(shared, DYNAMIC_TEACHER):
        result["dynamic_teacher"] = evaluate(shared, val_loader, device)
    gap, scale = logit_gap(shared, exported, val_loader, device)
    result.update(max_logit_diff=gap, agree=gap <= AGREE_RTOL * max(scale, 1.0))
    return {**result["exported"], **result}


def _holds_shared_model(cfg, path, num_classes) -> bool:
    shared = widen_student(cfg, build_model(cfg.DISTILLER.STUDENT, num_classes), check=False)
    return set(read_state_dict(path)) == set(shared.state_dict())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--ckpt", help="student checkpoint to evaluate")
    parser.add_argument("--teacher", action="store_true", help="evaluate the config's teacher instead")
    parser.add_argument("--debug", action="store_true", help=f"full tracebacks (also {DEBUG_ENV}=1)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides (before or after the options)")
    args = parser.parse_intermixed_args(argv)  # `--cfg CFG KEY VALUE --ckpt X` as well
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
        if not args.teacher and cfg.GPD.ENABLED and _holds_shared_model(cfg, args.ckpt, num_classes):
            result = evaluate_gpd(cfg, args.ckpt, num_classes, val_loader, info.device)
        else:
            if not args.teacher:
                model = load_teacher_weights(build_model(name, num_classes), args.ckpt)  # strict load
            result = evaluate(model.to(info.device), val_loader, info.device)
    except (ConfigError, OSError, ValueError, KeyError) as exc:
        if args.debug or debug_requested():
            raise
        print(f"eval_cls.py: error: {format_error(exc)}", file=sys.stderr)
        return 1
    if info.is_main:
        print(json.dumps({"model": name, "ckpt": args.ckpt or "teacher", **result}))
    if result.get("agree") is False:
        print(f"eval_cls.py: error: the exported student differs from the shared model at student width by "
              f"{result['max_logit_diff']:.3g} in the logits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
