#!/usr/bin/env python
"""Classification demo on the embedded digits: a few labels, a teacher that saw them all (CPU).

The setting where distillation is known to matter: the teacher (configs/cls/digits/teacher.yaml,
ResNet-20) is trained on the whole training split (1258 images), each student (ResNet-8,
configs/cls/digits/<method>.yaml) on only 5 labelled images per class (50 images) of it. The
teacher's soft labels on the randomly shifted views of those 50 images carry what it learnt
from the rest; the vanilla student has only the 50 labels.

    python tools/cls_demo.py [--out output/cls_demo] [--seeds 0 1 2] [--methods ...] [--quick] [KEY VALUE ...]

Rows: vanilla, kd, dkd, deepkd_kd, deepkd_dkd, dot_dkd (the default set), mlkd, deepkd_mlkd,
crld, deepkd_crld (two views, about twice the cost), diffkd, deepkd_diffkd, gpd (from scratch),
gpd_dkd, deepkd_gpd_dkd (several times a DKD row's cost; ``--methods all`` runs every row). Every
row is the mean ± std over the seeds; the table marks which differences from the vanilla
student (and DeepKD-X from X) exceed the spread, i.e. |mean difference| > std_a + std_b.
The DeepKD rows measure the GSNR/BSNR of TOG/TCG/NCG (DEEPKD.GSNR). Writes <out>/results.md,
<out>/summary.json and the picture <out>/cls_demo.png (validation curves with seed bands,
per-seed results, the top-k schedule K, GSNR and BSNR). An identical teacher already in
<out>/teacher is reused. ``--quick``: a tiny smoke run (a teacher of 2 epochs, 3 rows, 2 seeds).
Trailing KEY VALUE pairs override every student config. Whatever the numbers show is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from typing import Dict

from deepkd_det.cls.config import load_cfg
from deepkd_det.cls.data import build_datasets

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:  # tools/demo_report.py, also when this file is loaded by path
    sys.path.insert(0, TOOLS)

from demo_report import (  # noqa: E402
    add_demo_arguments,
    compare,
    demo_methods_and_seeds,
    demo_pool,
    docs_targets,
    fmt_mean_std,
    picture_table,
    plot_report,
    publish_to_docs,
    verdict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "cls", "digits")

METHODS = (("vanilla", "vanilla (CE)"), ("kd", "KD"), ("deepkd_kd", "DeepKD-KD"), ("dkd", "DKD"),
           ("deepkd_dkd", "DeepKD-DKD"), ("dot_dkd", "DOT-DKD"), ("mlkd", "MLKD"), ("deepkd_mlkd", "DeepKD-MLKD"),
           ("crld", "CRLD"), ("deepkd_crld", "DeepKD-CRLD"), ("diffkd", "DiffKD"), ("deepkd_diffkd", "DeepKD-DiffKD"),
           ("gpd", "GPD (scratch)"), ("gpd_dkd", "GPD-DKD"), ("deepkd_gpd_dkd", "DeepKD-GPD-DKD"))
LABELS = dict(METHODS)
DEFAULT_METHODS = ("vanilla", "kd", "deepkd_kd", "dkd", "deepkd_dkd", "dot_dkd")
QUICK_METHODS = ("vanilla", "kd", "deepkd_dkd")
# DeepKD-X is compared with X as well as with the vanilla student.
PLAIN_OF = {"deepkd_kd": "kd", "deepkd_dkd": "dkd", "deepkd_mlkd": "mlkd", "deepkd_crld": "crld", "dot_dkd": "dkd",
            "deepkd_diffkd": "diffkd", "gpd_dkd": "dkd", "deepkd_gpd_dkd": "gpd_dkd"}
QUIET = ["LOG.PROGRESS_BAR", "False", "LOG.TENSORBOARD", "False"]
# 5 steps an epoch: a 5-batch GSNR window every 3 epochs.
GSNR_OPTS = ["DEEPKD.GSNR.ENABLED", "True", "DEEPKD.GSNR.WINDOW", "5", "DEEPKD.GSNR.PERIOD", "15"]
# --quick: 8x8 images, a 2-epoch teacher on 300 images, 3-epoch students (a smoke run, not a result).
QUICK_TEACHER = ["SOLVER.EPOCHS", "2", "LOG.SAVE_EVERY", "2", "DATASET.DIGITS.TRAIN_LIMIT", "300",
                 "DATASET.DIGITS.SIZE", "8"]
QUICK_STUDENT = ["SOLVER.EPOCHS", "3", "LOG.EVAL_EVERY", "1", "LOG.SAVE_EVERY", "3", "DATASET.DIGITS.SIZE", "8"]
QUICK_GSNR = ["DEEPKD.GSNR.ENABLED", "True", "DEEPKD.GSNR.WINDOW", "2", "DEEPKD.GSNR.PERIOD", "5"]


def _train_job(cfg_file: str, opts, threads: int) -> dict:
    """One training run (in a worker process, or inline with --jobs 1): quiet, ``threads`` torch threads."""
    import torch

    from deepkd_det.cls.engine import ClsTrainer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = load_cfg(cfg_file, opts)
        shutil.rmtree(cfg.OUTPUT_DIR, ignore_errors=True)  # metrics.jsonl appends: start clean
        with contextlib.redirect_stdout(io.StringIO()):
            return ClsTrainer(cfg).train()
    finally:
        torch.set_num_threads(before)


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


def read_run(run_dir: str, steps_per_epoch: int) -> Dict[str, list]:
    """Curves of one run from its metrics.jsonl: val top-1 and K per epoch, GSNR/BSNR per epoch."""
    curves: Dict[str, list] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("type") == "epoch":
                for key in ("val/top1", "topk/K"):
                    if key in row:
                        curves.setdefault(key, []).append((row["epoch"], row[key]))
            elif row.get("type") == "gsnr":
                for key, value in row.items():
                    if key.startswith(("gsnr/", "bsnr/")) and key.count("/") == 1:
                        curves.setdefault(key, []).append((row["iter"] / steps_per_epoch, value))
    return curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output directory (default output/cls_demo, or output/cls_demo_quick)")
    add_demo_arguments(parser, LABELS, DEFAULT_METHODS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for the student configs")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("output", "cls_demo_quick" if args.quick else "cls_demo")
    methods, seeds = demo_methods_and_seeds(parser, args, LABELS, DEFAULT_METHODS, QUICK_METHODS)
    try:
        docs_targets(args, "cls_demo")
    except ValueError as exc:
        parser.error(str(exc))
    student_opts = (QUICK_STUDENT if args.quick else []) + list(args.opts)
    start = time.time()

    teacher_file = os.path.join(CONFIGS, "teacher.yaml")
    teacher_opts = ["OUTPUT_DIR", os.path.join(out, "teacher")] + QUIET + (QUICK_TEACHER if args.quick else [])
    teacher_cfg = load_cfg(teacher_file, teacher_opts)
    teacher_ckpt = os.path.join(teacher_cfg.OUTPUT_DIR, f"ckpt_epoch_{teacher_cfg.SOLVER.EPOCHS}.pth")
    teacher = _trained_teacher(teacher_cfg)
    jobs = {}
    for key in methods:
        deep = load_cfg(os.path.join(CONFIGS, f"{key}.yaml"), student_opts).DEEPKD.ENABLED
        for seed in seeds:
            opts = (["SEED", str(seed), "OUTPUT_DIR", os.path.join(out, key, f"seed{seed}"), "TEACHER.CKPT", teacher_ckpt]
                    + QUIET + ((QUICK_GSNR if args.quick else GSNR_OPTS) if deep else []) + student_opts)
            load_cfg(os.path.join(CONFIGS, f"{key}.yaml"), opts)  # refuse bad overrides before starting
            jobs[key, seed] = opts
    # Small convolutions on a 2-core machine: one thread per run, runs side by side.
    pool = demo_pool(args.jobs)
    def submit(job):
        return pool.submit(_train_job, os.path.join(CONFIGS, f"{job[0]}.yaml"), jobs[job], 1)

    with pool:
        futures = {}
        if teacher:
            print(f"[cls_demo] teacher {teacher_cfg.DISTILLER.STUDENT}: reusing {teacher_ckpt}", flush=True)
        else:
            print(f"[cls_demo] teacher {teacher_cfg.DISTILLER.STUDENT}: training ({teacher_cfg.SOLVER.EPOCHS} epochs "
                  f"on the whole training split)", flush=True)
            pending = pool.submit(_train_job, teacher_file, teacher_opts, 1)
            # The vanilla students need no teacher: they train beside it.
            futures = {job: submit(job) for job in jobs if job[0] == "vanilla"}
            teacher = pending.result()
        print(f"[cls_demo] teacher top-1 {teacher['last_top1']:.2f}  ({time.time() - start:.0f} s)", flush=True)
        futures.update({job: submit(job) for job in jobs if job not in futures})
        results = {key: {"label": LABELS[key], "last_top1": [], "best_top1": []} for key in methods}
        for (key, seed), future in futures.items():
            summary = future.result()
            results[key]["last_top1"].append(summary["last_top1"])
            results[key]["best_top1"].append(summary["best_top1"])
            print(f"[cls_demo] {results[key]['label']:<12} seed {seed}: top-1 {summary['last_top1']:.2f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    elapsed = time.time() - start

    student = load_cfg(os.path.join(CONFIGS, "vanilla.yaml"), student_opts)
    train_set, val_set, _ = build_datasets(student)
    steps_per_epoch = len(train_set) // student.SOLVER.BATCH_SIZE
    d = student.DATASET.DIGITS
    subset = f"{d.TRAIN_PER_CLASS} per class, " if d.TRAIN_PER_CLASS else ""
    lines = [
        f"Digits 8x8 -> {d.SIZE}x{d.SIZE}: teacher {teacher_cfg.DISTILLER.STUDENT} trained on the whole training "
        f"split, top-1 {teacher['last_top1']:.2f}; student {student.DISTILLER.STUDENT} on {len(train_set)} labelled "
        f"images ({subset}the same for every seed), {student.SOLVER.EPOCHS} epochs; {len(val_set)} held-out images; "
        f"seeds {seeds}.",
        "Difference vs the vanilla student (and DeepKD-X vs X): **bold** where |mean difference| > std_a + std_b.",
        "",
        "| method | top-1 last epoch | best epoch | per seed (last) | vs vanilla | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    comparisons = {}
    for key in methods:
        r = results[key]
        per_seed = ", ".join(f"{v:.2f}" for v in r["last_top1"])
        vs_van = vs_plain = "-"
        if key != "vanilla" and "vanilla" in results:
            comparisons[f"{key} - vanilla"] = c = compare(r["last_top1"], results["vanilla"]["last_top1"])
            vs_van = verdict(c)
        plain = PLAIN_OF.get(key)
        if plain in results:
            comparisons[f"{key} - {plain}"] = c = compare(r["last_top1"], results[plain]["last_top1"])
            vs_plain = f"{verdict(c)} vs {LABELS[plain]}"
        lines.append(f"| {r['label']} | {fmt_mean_std(r['last_top1'])} | {fmt_mean_std(r['best_top1'])} | {per_seed} | "
                     f"{vs_van} | {vs_plain} |")
    lines.append("")
    lines.append(f"total time {elapsed:.0f} s")
    table = "\n".join(lines)
    print()
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"teacher_top1": teacher["last_top1"], "seeds": seeds, "results": results,
                   "comparisons": comparisons, "total_s": elapsed}, f, indent=2)
    curves = {key: [read_run(os.path.join(out, key, f"seed{s}"), steps_per_epoch) for s in seeds] for key in methods}
    png = os.path.join(out, "cls_demo.png")
    finals = [v for r in results.values() for v in r["last_top1"]] + [teacher["last_top1"]]
    note = (lines[0] + " GSNR/BSNR: one 5-batch window every 3 epochs, mean over the student's parameters; "
            "NCG is exactly 0 while K = 1 (not drawn on the log axis).")
    plot_report(results, curves, png, metric="last_top1", curve="val/top1", k_curve="topk/K",
                teacher=teacher["last_top1"], unit="top-1 (%)", x_label="epoch", note=note,
                table=picture_table(results, comparisons, LABELS, PLAIN_OF, "last_top1", "top-1 last epoch"),
                val_ylim=(max(0.0, min(finals) - 10.0), min(100.5, max(finals) + 2.0)))
    print(f"\n[cls_demo] table {os.path.join(out, 'results.md')}, picture {png}", flush=True)
    for path in publish_to_docs(args, "cls_demo", argv, table, png):
        print(f"[cls_demo] wrote the table into {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
