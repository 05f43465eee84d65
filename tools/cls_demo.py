#!/usr/bin/env python
"""Classification demo on the embedded digits (CPU, nothing downloaded, a few minutes).

Trains the digits teacher once (configs/cls/digits/teacher.yaml; an identical teacher already
in <out>/teacher is reused), then a student with each method (configs/cls/digits/<method>.yaml)
for several seeds, and prints the mean ± std of the students' top-1 on the held-out digits:

    python tools/cls_demo.py [--out output/cls_demo] [--seeds 0 1 2] [--methods ...] [KEY VALUE ...]

Methods (rows): vanilla, kd, dkd, deepkd_dkd, mlkd, crld, dot_dkd (the default set) and
deepkd_mlkd, deepkd_crld, gpd (from scratch), gpd_dkd, deepkd_gpd_dkd (GPD: a 2x dynamic teacher
sharing the student's weights, several times a DKD row's cost); ``--methods all`` runs every row. Trailing KEY VALUE pairs override
every student config. Results also go to <out>/summary.json and <out>/results.md. Whatever the
numbers show is what is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from deepkd_det.cls.config import load_cfg
from deepkd_det.cls.data import build_datasets
from deepkd_det.cls.engine import ClsTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = (("vanilla", "vanilla (CE)"), ("kd", "KD"), ("dkd", "DKD"), ("deepkd_dkd", "DeepKD-DKD"),
           ("mlkd", "MLKD"), ("deepkd_mlkd", "DeepKD-MLKD"), ("crld", "CRLD"), ("deepkd_crld", "DeepKD-CRLD"),
           ("dot_dkd", "DOT-DKD"), ("gpd", "GPD (scratch)"), ("gpd_dkd", "GPD-DKD"),
           ("deepkd_gpd_dkd", "DeepKD-GPD-DKD"))
LABELS = dict(METHODS)
# The two-view DeepKD rows cost about twice a plain MLKD/CRLD row, the GPD rows several DKD rows:
# selectable, not in the default set.
DEFAULT_METHODS = ("vanilla", "kd", "dkd", "deepkd_dkd", "mlkd", "crld", "dot_dkd")
QUIET = ["LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False"]


def _train_job(cfg_file: str, opts, threads: int) -> dict:
    """One training run (in a worker process): quiet, with its own torch thread count."""
    import torch

    torch.set_num_threads(threads)
    cfg = load_cfg(cfg_file, opts)
    with contextlib.redirect_stdout(io.StringIO()):
        return ClsTrainer(cfg).train()


def _trained_teacher(cfg) -> dict:
    """The summary of a finished teacher run with exactly this config in cfg.OUTPUT_DIR, else {}."""
    out = cfg.OUTPUT_DIR
    ckpt = os.path.join(out, f"ckpt_epoch_{cfg.SOLVER.EPOCHS}.pth")
    try:
        with open(os.path.join(out, "config.yaml")) as f:
            same = f.read() == cfg.dump()
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    except (OSError, ValueError):
        return {}
    last = [r for r in rows if r.get("type") == "epoch"][-1:] if same and os.path.isfile(ckpt) else []
    if not last or last[0]["epoch"] != cfg.SOLVER.EPOCHS or "val/top1" not in last[0]:
        return {}
    return {"last_top1": last[0]["val/top1"]}


def _fmt(values) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {std:4.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/cls_demo", help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel (one torch thread each)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"rows to run, from {', '.join(LABELS)}, or 'all' (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for the student configs")
    args = parser.parse_args(argv)
    methods = list(LABELS) if args.methods == ["all"] else list(dict.fromkeys(args.methods))
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(LABELS)} or 'all'")
    configs = os.path.join(ROOT, "configs", "cls", "digits")
    start = time.time()

    teacher_file = os.path.join(configs, "teacher.yaml")
    teacher_opts = ["OUTPUT_DIR", os.path.join(args.out, "teacher")] + QUIET
    teacher_cfg = load_cfg(teacher_file, teacher_opts)
    teacher_ckpt = os.path.join(teacher_cfg.OUTPUT_DIR, f"ckpt_epoch_{teacher_cfg.SOLVER.EPOCHS}.pth")
    teacher = _trained_teacher(teacher_cfg)
    # Small convolutions on a shared 2-core machine: one thread per run, runs side by side.
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        if teacher:
            print(f"[demo] teacher {teacher_cfg.DISTILLER.STUDENT}: reusing {teacher_ckpt}", flush=True)
        else:
            print(f"[demo] teacher {teacher_cfg.DISTILLER.STUDENT}: training ({teacher_cfg.SOLVER.EPOCHS} epochs)",
                  flush=True)
            teacher = pool.submit(_train_job, teacher_file, teacher_opts, 1).result()
        print(f"[demo] teacher top-1 {teacher['last_top1']:.2f}  ({time.time() - start:.0f} s)", flush=True)
        futures = {}
        for key in methods:
            for seed in args.seeds:
                opts = ["SEED", str(seed), "OUTPUT_DIR", os.path.join(args.out, key, f"seed{seed}"),
                        "TEACHER.CKPT", teacher_ckpt] + QUIET + list(args.opts)
                load_cfg(os.path.join(configs, f"{key}.yaml"), opts)  # refuse bad overrides before starting
                futures[key, seed] = pool.submit(_train_job, os.path.join(configs, f"{key}.yaml"), opts, 1)
        results = {key: {"label": LABELS[key], "last_top1": [], "best_top1": []} for key in methods}
        for (key, seed), future in futures.items():
            summary = future.result()
            results[key]["last_top1"].append(summary["last_top1"])
            results[key]["best_top1"].append(summary["best_top1"])
            print(f"[demo] {results[key]['label']:<12} seed {seed}: top-1 {summary['last_top1']:.2f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    student = load_cfg(os.path.join(configs, "vanilla.yaml"), list(args.opts))
    train_set, val_set, _ = build_datasets(student)
    lines = [
        f"Digits (scikit-learn 8x8 digits upsampled to {student.DATASET.DIGITS.SIZE}x{student.DATASET.DIGITS.SIZE}, "
        f"{len(train_set)} training / {len(val_set)} held-out images); teacher "
        f"{teacher_cfg.DISTILLER.STUDENT} {teacher['last_top1']:.2f}, student {student.DISTILLER.STUDENT}, "
        f"{student.SOLVER.EPOCHS} epochs, seeds {args.seeds}",
        "",
        "| method | top-1 last epoch (mean ± std) | best epoch (mean ± std) | per seed (last) |",
        "|---|---|---|---|",
    ]
    for key in methods:
        r = results[key]
        per_seed = ", ".join(f"{v:.2f}" for v in r["last_top1"])
        lines.append(f"| {r['label']} | {_fmt(r['last_top1'])} | {_fmt(r['best_top1'])} | {per_seed} |")
    lines.append("")
    lines.append(f"total time {time.time() - start:.0f} s")
    table = "\n".join(lines)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"teacher_top1": teacher["last_top1"], "seeds": args.seeds, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
