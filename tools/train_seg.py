#!/usr/bin/env python
"""Train a segmentation student (plain, KD / DKD / DiffKD per pixel, each with or without DeepKD) or a teacher.

    python tools/train_seg.py --cfg configs/seg/synthetic/deepkd_dkd.yaml [--resume] [KEY VALUE ...]

Trailing ``KEY VALUE`` pairs override the config (``SOLVER.MAX_ITER 100 DEEPKD.ENABLED False``).
docs/segmentation.md describes the data layouts, methods and outputs.
"""

from __future__ import annotations

import argparse
import sys

from deepkd_det.cli import DEBUG_ENV, debug_requested, format_error, pull_trailing_flags
from deepkd_det.seg.config import ConfigError, load_seg_cfg
from deepkd_det.seg.engine import NonFiniteLossError, SegTrainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="yaml config (configs/seg/...)")
    parser.add_argument("--resume", action="store_true", help="continue from <OUTPUT_DIR>/latest.pth")
    parser.add_argument("--debug", action="store_true", help=f"full tracebacks (also {DEBUG_ENV}=1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        opts, late = pull_trailing_flags(args.opts, ("--resume", "--debug"))
        args.resume = args.resume or "--resume" in late
        args.debug = args.debug or "--debug" in late
        cfg = load_seg_cfg(args.cfg, opts)
        summary = SegTrainer(cfg, resume=args.resume).train()
    except (ConfigError, OSError, NonFiniteLossError, ValueError, KeyError) as exc:
        if args.debug or debug_requested():
            raise
        print(f"train_seg.py: error: {format_error(exc)}", file=sys.stderr)
        return 1
    print(f"iteration {summary['iteration']}: mIoU {summary['mIoU']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
