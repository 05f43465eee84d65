#!/usr/bin/env python
"""Segmentation demo on generated scenes: a teacher that saw many, students that see few (CPU).

The teacher (configs/seg/synthetic/teacher.yaml: a wider tiny DeepLabV3) trains on 300 generated
scenes (background + circle, square, triangle, 64 x 64, a 1-pixel ignore band on every outline);
each student (a narrow tiny DeepLabV3, configs/seg/synthetic/<method>.yaml) trains on the first 6
of them only, for 300 iterations (long enough to overfit them alone). The teacher's per-pixel
predictions on the augmented crops of those 6 scenes carry what it learnt from the rest.

    python tools/seg_demo.py [--out output/seg_demo] [--seeds 0 1 2] [--methods ...] [--jobs 2] [--quick] [KEY VALUE ...]

Rows: vanilla, kd, deepkd_kd, dkd, deepkd_dkd, diffkd, deepkd_diffkd (all by default). Each row is
the mean ± std of the final mIoU over the seeds (40 held-out scenes); the table marks which
differences from the vanilla student (and DeepKD-X from X) exceed the spread, |mean difference| >
std_a + std_b. Writes <out>/results.md, <out>/summary.json and <out>/seg_demo.png (mIoU curves
with seed bands, predictions beside the ground truth). A finished teacher with the same config in
<out>/teacher is reused. ``--quick``: a smoke run (short teacher, 3 rows, 2 seeds, few iterations).
Trailing KEY VALUE pairs override every student config.
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
from typing import Dict, List

from deepkd_det.seg.config import load_seg_cfg

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
    publish_to_docs,
    seed_band,
    verdict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "seg", "synthetic")
METHODS = (("vanilla", "vanilla (CE)"), ("kd", "KD"), ("deepkd_kd", "DeepKD-KD"), ("dkd", "DKD"),
           ("deepkd_dkd", "DeepKD-DKD"), ("diffkd", "DiffKD"), ("deepkd_diffkd", "DeepKD-DiffKD"))
LABELS = dict(METHODS)
DEFAULT_METHODS = tuple(LABELS)
QUICK_METHODS = ("vanilla", "kd", "deepkd_dkd")
PLAIN_OF = {"deepkd_kd": "kd", "deepkd_dkd": "dkd", "deepkd_diffkd": "diffkd"}
QUICK_DATA = ["DATASET.SYNTHETIC.SIZE", "32", "INPUT.CROP_SIZE", "[32, 32]", "DATASET.SYNTHETIC.VAL_IMAGES", "6"]
QUICK_TEACHER = QUICK_DATA + ["SOLVER.MAX_ITER", "30", "TEST.EVAL_PERIOD", "30", "DATASET.SYNTHETIC.TRAIN_IMAGES", "40",
                 "SOLVER.CHECKPOINT_PERIOD", "30", "MODEL.WIDTH", "8", "MODEL.HEAD_CHANNELS", "16"]
QUICK_STUDENT = QUICK_DATA + ["SOLVER.MAX_ITER", "12", "TEST.EVAL_PERIOD", "6", "SOLVER.CHECKPOINT_PERIOD", "12",
                              "MODEL.WIDTH", "4", "MODEL.HEAD_CHANNELS", "8", "TEACHER.WIDTH", "8",
                              "TEACHER.HEAD_CHANNELS", "16"]


def _train_job(cfg_file: str, opts: List[str], threads: int) -> dict:
    """One training run, quiet, with ``threads`` torch threads (in a worker process or inline)."""
    import torch

    from deepkd_det.seg.engine import SegTrainer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = load_seg_cfg(cfg_file, opts)
        shutil.rmtree(cfg.OUTPUT_DIR, ignore_errors=True)  # metrics.jsonl appends: start clean
        with contextlib.redirect_stdout(io.StringIO()):
            return SegTrainer(cfg).train()
    finally:
        torch.set_num_threads(before)


def _finished_teacher(cfg) -> dict:
    """The summary of a finished teacher run with exactly this config in cfg.OUTPUT_DIR, else {}."""
    out = cfg.OUTPUT_DIR
    try:
        with open(os.path.join(out, "config.yaml")) as f:
            same = f.read() == cfg.dump()
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    except (OSError, ValueError):
        return {}
    evals = [r for r in rows if r.get("type") == "eval"]
    if not (same and evals and evals[-1]["iter"] == cfg.SOLVER.MAX_ITER
            and os.path.isfile(os.path.join(out, "student_final.pth"))):
        return {}
    return {"mIoU": evals[-1]["mIoU"], "iteration": evals[-1]["iter"]}


def read_curve(run_dir: str) -> Dict[str, list]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"mIoU": [(r["iter"], r["mIoU"]) for r in rows if r.get("type") == "eval"],
            "K": [(r["iter"], r["K"]) for r in rows if r.get("type") == "train" and "K" in r]}


def _palette():
    import numpy as np

    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:7] = [(40, 40, 40), (230, 80, 60), (60, 160, 230), (240, 200, 40), (150, 90, 200), (90, 200, 120),
                   (250, 140, 200)]
    colours[255] = (255, 255, 255)
    return colours


def _predictions(out: str, methods, teacher_cfg, seed: int, count: int):
    """Images, ground truth and each model's prediction for the first ``count`` held-out scenes."""
    import torch

    from deepkd_det.core.io import load_weights_only
    from deepkd_det.seg.data import build_seg_datasets, eval_tensors
    from deepkd_det.seg.models import build_seg_model

    def model_of(cfg, path):
        m = cfg.MODEL
        model = build_seg_model(m.BACKBONE, m.HEAD, cfg.DATASET.SYNTHETIC.NUM_SHAPES + 1, width=m.WIDTH,
                                head_channels=m.HEAD_CHANNELS, aspp_rates=m.ASPP_RATES)
        model.load_state_dict(load_weights_only(path)["model"])
        return model.eval()

    _, val, _ = build_seg_datasets(teacher_cfg)
    models = [("teacher", model_of(teacher_cfg, os.path.join(teacher_cfg.OUTPUT_DIR, "student_final.pth")))]
    for key in methods:
        run = os.path.join(out, key, f"seed{seed}")
        cfg = load_seg_cfg(os.path.join(run, "config.yaml"), validate=False)
        models.append((LABELS[key], model_of(cfg, os.path.join(run, "student_final.pth"))))
    rows = []
    i = teacher_cfg.INPUT
    with torch.no_grad():
        for k in range(min(count, len(val))):
            image, label = val[k]
            x, _ = eval_tensors(image, label, i.MEAN, i.STD)
            rows.append((image, label, [(name, m(x[None]).argmax(1)[0].numpy()) for name, m in models]))
    return rows


def plot(path: str, results, curves, teacher: dict, predictions, table: List[str], note: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = _palette()
    cols = 2 + len(predictions[0][2])
    n = len(predictions)
    fig = plt.figure(figsize=(max(14, 1.9 * cols), 5.2 + 1.9 * n + 0.25 * len(table)))
    grid = fig.add_gridspec(2 + n, cols, height_ratios=[3.2] + [1.9] * n + [0.25 * len(table) + 0.6])
    ax = fig.add_subplot(grid[0, : cols // 2 + 1])
    colours = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for key, runs in curves.items():
        xs, mean, std = seed_band(runs, "mIoU")
        if xs:
            ax.plot(xs, mean, marker=".", color=colours[key], label=results[key]["label"])
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colours[key], alpha=0.15)
    ax.axhline(teacher["mIoU"], color="k", ls="--", lw=1, label=f"teacher {teacher['mIoU']:.1f}")
    ax.set(title="held-out mIoU, mean ± std over seeds", xlabel="iteration", ylabel="mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax_note = fig.add_subplot(grid[0, cols // 2 + 1:])
    ax_note.axis("off")
    ax_note.text(0, 1, "\n".join(textwrap.wrap(note, 70)), va="top", fontsize=9, transform=ax_note.transAxes)
    for r, (image, label, preds) in enumerate(predictions):
        panels = [("image", image), ("ground truth", palette[label])] + [(name, palette[p]) for name, p in preds]
        for c, (title, img) in enumerate(panels):
            a = fig.add_subplot(grid[1 + r, c])
            a.imshow(img, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(title, fontsize=9)
    ax_t = fig.add_subplot(grid[1 + n, :])
    ax_t.axis("off")
    ax_t.text(0, 1, "\n".join(table), va="top", family="monospace", fontsize=8.5, transform=ax_t.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output directory (default output/seg_demo, or output/seg_demo_quick)")
    add_demo_arguments(parser, LABELS, DEFAULT_METHODS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for the student configs")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("output", "seg_demo_quick" if args.quick else "seg_demo")
    methods, seeds = demo_methods_and_seeds(parser, args, LABELS, DEFAULT_METHODS, QUICK_METHODS)
    try:
        docs_targets(args, "seg_demo")  # a missing docs block stops the run before it starts
    except ValueError as exc:
        parser.error(str(exc))
    student_opts = (QUICK_STUDENT if args.quick else []) + list(args.opts)
    start = time.time()

    teacher_file = os.path.join(CONFIGS, "teacher.yaml")
    teacher_opts = ["OUTPUT_DIR", os.path.join(out, "teacher")] + (QUICK_TEACHER if args.quick else [])
    teacher_cfg = load_seg_cfg(teacher_file, teacher_opts)
    teacher_ckpt = os.path.join(teacher_cfg.OUTPUT_DIR, "student_final.pth")
    jobs = {}
    for key in methods:
        for seed in seeds:
            opts = ["SEED", str(seed), "OUTPUT_DIR", os.path.join(out, key, f"seed{seed}"),
                    "TEACHER.CKPT", teacher_ckpt] + student_opts
            load_seg_cfg(os.path.join(CONFIGS, f"{key}.yaml"), opts)  # refuse bad overrides before starting
            jobs[key, seed] = opts
    teacher = _finished_teacher(teacher_cfg)
    pool = demo_pool(args.jobs)

    def submit(job):
        return pool.submit(_train_job, os.path.join(CONFIGS, f"{job[0]}.yaml"), jobs[job], 1)

    with pool:
        futures = {}
        if teacher:
            print(f"[seg_demo] teacher: reusing {teacher_ckpt}", flush=True)
        else:
            print(f"[seg_demo] teacher: training ({teacher_cfg.SOLVER.MAX_ITER} iterations on "
                  f"{teacher_cfg.DATASET.SYNTHETIC.TRAIN_IMAGES} scenes)", flush=True)
            pending = pool.submit(_train_job, teacher_file, teacher_opts, 1)
            futures = {job: submit(job) for job in jobs if job[0] == "vanilla"}  # no teacher needed
            pending.result()
            teacher = _finished_teacher(teacher_cfg)
        print(f"[seg_demo] teacher mIoU {teacher['mIoU']:.2f}  ({time.time() - start:.0f} s)", flush=True)
        futures.update({job: submit(job) for job in jobs if job not in futures})
        results = {key: {"label": LABELS[key], "mIoU": []} for key in methods}
        for (key, seed), future in futures.items():
            summary = future.result()
            results[key]["mIoU"].append(summary["mIoU"])
            print(f"[seg_demo] {LABELS[key]:<14} seed {seed}: mIoU {summary['mIoU']:.2f}  "
                  f"({time.time() - start:.0f} s)", flush=True)
    elapsed = time.time() - start

    s = load_seg_cfg(os.path.join(CONFIGS, "vanilla.yaml"), student_opts)
    syn = s.DATASET.SYNTHETIC
    lines = [
        f"Generated scenes ({syn.SIZE}x{syn.SIZE}, background + {syn.NUM_SHAPES} shapes, 1-px ignore band): teacher "
        f"(tiny DeepLabV3, width {teacher_cfg.MODEL.WIDTH}) trained on {teacher_cfg.DATASET.SYNTHETIC.TRAIN_IMAGES} "
        f"scenes, mIoU {teacher['mIoU']:.2f}; students (tiny DeepLabV3, width {s.MODEL.WIDTH}) on "
        f"{syn.TRAIN_IMAGES} scenes (the same for every seed), {s.SOLVER.MAX_ITER} iterations of batch "
        f"{s.SOLVER.IMS_PER_BATCH}; mIoU on {syn.VAL_IMAGES} held-out scenes; seeds {seeds}.",
        "Difference vs the vanilla student (and DeepKD-X vs X): **bold** where |mean difference| > std_a + std_b.",
        "",
        "| method | mIoU (final) | per seed | vs vanilla | vs plain |",
        "|---|---|---|---|---|",
    ]
    comparisons, text = {}, [f"{'method':<15} {'mIoU':>14}   {'vs vanilla':<30} vs plain"]
    for key in methods:
        r = results[key]
        vs_van = vs_plain = "-"
        if key != "vanilla" and "vanilla" in results:
            comparisons[f"{key} - vanilla"] = c = compare(r["mIoU"], results["vanilla"]["mIoU"])
            vs_van = verdict(c)
        plain = PLAIN_OF.get(key)
        if plain in results:
            comparisons[f"{key} - {plain}"] = c = compare(r["mIoU"], results[plain]["mIoU"])
            vs_plain = f"{verdict(c)} vs {LABELS[plain]}"
        per_seed = ", ".join(f"{v:.2f}" for v in r["mIoU"])
        lines.append(f"| {r['label']} | {fmt_mean_std(r['mIoU'])} | {per_seed} | {vs_van} | {vs_plain} |")
        text.append(f"{r['label']:<15} {fmt_mean_std(r['mIoU']):>14}   {vs_van.replace('**', ''):<30} "
                    f"{vs_plain.replace('**', '')}")
    lines += ["", f"total time {elapsed:.0f} s"]
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"teacher": teacher, "seeds": seeds, "results": results, "comparisons": comparisons,
                   "total_s": elapsed}, f, indent=2)
    curves = {key: [read_curve(os.path.join(out, key, f"seed{sd}")) for sd in seeds] for key in methods}
    png = os.path.join(out, "seg_demo.png")
    preds = _predictions(out, methods, teacher_cfg, seeds[0], 3)
    plot(png, results, curves, teacher, preds, text, lines[0] + f" Predictions: seed {seeds[0]} of each row; "
         "white = ignore (the outline band).")
    print(f"\n[seg_demo] table {os.path.join(out, 'results.md')}, picture {png}", flush=True)
    for path in publish_to_docs(args, "seg_demo", argv, table, png):
        print(f"[seg_demo] wrote the table into {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
