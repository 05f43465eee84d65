#!/usr/bin/env python
"""Train a classification student (plain or DeepKD KD/DKD) or a teacher from scratch.

    python tools/train_cls.py --cfg configs/cls/digits/deepkd_dkd.yaml [--resume] [KEY VALUE ...]
    torchrun --nproc_per_node 2 tools/train_cls.py --cfg configs/cls/cifar100/dkd/resnet32x4_resnet8x4.yaml

Trailing ``KEY VALUE`` pairs override the config (``SOLVER.EPOCHS 10 DEEPKD.ENABLED False``).
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from deepkd_det.cli import DEBUG_ENV, debug_requested, format_error, pull_trailing_flags
from deepkd_det.cls.config import ConfigError, load_cfg
from deepkd_det.cls.engine import ClsTrainer, NonFiniteLossError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="yaml config (configs/cls/...)")
    parser.add_argument("--resume", action="store_true", help="continue from <output dir>/latest.pth")
    parser.add_argument("--debug", action="store_true", help=f"full tracebacks (also {DEBUG_ENV}=1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        # --resume / --debug typed after the overrides still count as options.
        opts, late = pull_trailing_flags(args.opts, ("--resume", "--debug"))
        args.resume = args.resume or "--resume" in late
        args.debug = args.debug or "--debug" in late
        cfg = load_cfg(args.cfg, opts)
        trainer = ClsTrainer(cfg, resume=args.resume)
        summary = trainer.train()
    except (ConfigError, OSError, NonFiniteLossError, ValueError, KeyError) as exc:
        if args.debug or debug_requested():
            raise
        print(f"train_cls.py: error: {format_error(exc)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if not trainer.dist.is_main:
        return 0
    print(f"best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
          f"last top-1 {summary['last_top1']:.2f}, top-5 {summary['last_top5']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
