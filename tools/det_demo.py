#!/usr/bin/env python
"""The embedded detection demo: teacher, then a student three ways, on generated shapes (CPU).

    python tools/det_demo.py [--output output/det_demo] [--quick] [--threads N] [--reviewkd] [--diffkd]

1. generates the synthetic shapes set (COCO json + PNG, deterministic) under <output>/data;
2. trains a teacher (Faster R-CNN R-18-FPN, the longer schedule) with ``KD.TYPE NONE``;
3. trains the student (same detector, a third of the schedule) without distillation, with DKD,
   and with DeepKD on DKD, from the same seed (``--reviewkd``: also ReviewKD + DeepKD-DKD;
   ``--diffkd``: also DiffKD alone and DiffKD + DeepKD-DKD);
4. evaluates everything (and the untrained student) with COCOEvaluator and prints a table
   (AP, AP50, AP75, training time), saved as <output>/results.json, and a figure
   <output>/det_demo.png: loss curves (metrics.json), the top-k schedule K, the AP bars.

Everything runs through train_net.py's pieces (configs/DEEPKD/demo/*.yaml, DeepKDTrainer).
The default profile takes about 10 minutes on 2 CPU cores; ``--quick`` a minute or two (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional

import torch
from detectron2.config import get_cfg
from detectron2.engine import hooks
from detectron2.utils.env import seed_all_rng

import deepkd_det.det.modeling  # noqa: F401  (registers DeepKDRCNN)
from deepkd_det.det.checkpoint import DeepKDCheckpointer
from deepkd_det.det.config import add_deepkd_config, validate_deepkd_config
from deepkd_det.det.data import SHAPES_VAL, add_data_config, generate_shapes_dataset
from deepkd_det.det.engine import DeepKDTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEMO_CONFIGS = os.path.join(REPO, "configs", "DEEPKD", "demo")
# (run name, config file, which schedule: the teacher's or the student's)
RUNS = [
    ("teacher", "teacher.yaml", "teacher"),
    ("student", "student-vanilla.yaml", "student"),
    ("student + DKD", "student-dkd.yaml", "student"),
    ("student + DeepKD-DKD", "student-deepkd-dkd.yaml", "student"),
]
# Added with --reviewkd: ReviewKD features on the FPN plus DeepKD-DKD on the head logits.
REVIEWKD_RUN = ("student + ReviewKD + DeepKD-DKD", "student-reviewkd-deepkd.yaml", "student")
# Added with --diffkd: DiffKD on the FPN (+ box-regression KD) alone, and with DeepKD-DKD on the logits.
DIFFKD_RUNS = [
    ("student + DiffKD", "student-diffkd.yaml", "student"),
    ("student + DiffKD + DeepKD-DKD", "student-diffkd-deepkd.yaml", "student"),
]
PROFILES = {
    "default": dict(num_train=200, num_val=50, image_size=128, batch=8, teacher_iters=400, student_iters=130),
    "quick": dict(num_train=24, num_val=8, image_size=64, batch=4, teacher_iters=40, student_iters=12),
}
METRIC_PERIOD = 5  # metrics.json rows every 5 iterations (detectron2's default is 20)


def _slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_").replace("-", "_").lower()


def build_cfg(config: str, out_dir: str, data_root: str, profile: Dict, iters: int, teacher_weights: str = ""):
    cfg = add_data_config(add_deepkd_config(get_cfg()))
    cfg.merge_from_file(os.path.join(DEMO_CONFIGS, config))
    cfg.OUTPUT_DIR = out_dir
    s = cfg.DATASETS.SHAPES
    s.ROOT, s.NUM_TRAIN, s.NUM_VAL, s.IMAGE_SIZE = data_root, profile["num_train"], profile["num_val"], profile["image_size"]
    size = profile["image_size"]
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size, size
    # Linear scaling rule: the demo configs' lr is for 8 images per batch.
    cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR * profile["batch"] / cfg.SOLVER.IMS_PER_BATCH
    cfg.SOLVER.IMS_PER_BATCH = profile["batch"]
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.STEPS = (int(iters * 0.8),)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(iters // 5, 1))
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9  # only model_final
    cfg.DATASETS.TEST = ()  # evaluated separately, so that the training time is training only
    cfg.TEST.EVAL_PERIOD = 0
    if cfg.KD.TYPE != "NONE" or cfg.KD.REVIEWKD.ENABLED or cfg.KD.DIFFKD.ENABLED:  # a teacher is built
        cfg.TEACHER.MODEL.WEIGHTS = teacher_weights
    validate_deepkd_config(cfg)
    cfg.freeze()
    return cfg


def eval_cfg(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.KD.TYPE, cfg.DEEPKD.ENABLED = "NONE", False  # the student alone
    cfg.KD.REVIEWKD.ENABLED = cfg.KD.DIFFKD.ENABLED = False
    cfg.DATASETS.TEST = (SHAPES_VAL,)
    cfg.freeze()
    return cfg


def evaluate(cfg, model) -> Dict[str, float]:
    """bbox AP / AP50 / AP75 on the val split (no detection at all scores 0, not NaN)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary table
        results = DeepKDTrainer.test(eval_cfg(cfg), model)
    box = results.get("bbox", {})
    return {k: (0.0 if not math.isfinite(box.get(k, float("nan"))) else float(box[k])) for k in ("AP", "AP50", "AP75")}


def train_run(cfg):
    """Train from scratch (seeded); returns (training seconds, trainer)."""
    seed_all_rng(cfg.SEED)
    trainer = DeepKDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    for h in trainer._hooks:
        if isinstance(h, hooks.PeriodicWriter):
            h._period = METRIC_PERIOD
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, trainer


def read_metrics(out_dir: str) -> List[Dict]:
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: List[Dict], run_dirs: Dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_k, ax_ap) = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = dict(zip(run_dirs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name, out_dir in run_dirs.items():
        m = [r for r in read_metrics(out_dir) if "total_loss" in r]
        c = colours[name]
        ax_loss.plot([r["iteration"] for r in m], [r["total_loss"] for r in m], color=c, label=f"{name}: total")
        kd = [r for r in m if "loss_tckd" in r]
        if kd:
            ax_loss.plot([r["iteration"] for r in kd], [r["loss_tckd"] + r["loss_nckd"] for r in kd], "--",
                         color=c, label=f"{name}: TCKD + NCKD")
        k = [r for r in m if "kd/topk_k" in r]
        if k:
            ax_k.step([r["iteration"] for r in k], [r["kd/topk_k"] for r in k], where="post", color=c, label=name)
    ax_loss.set(title="training losses (metrics.json)", xlabel="iteration", ylabel="loss")
    ax_loss.legend(fontsize=7)
    ax_k.set(title="top-k mask: K non-target classes kept", xlabel="iteration", ylabel="K")
    ax_k.legend(fontsize=8)
    names = [r["name"] for r in rows]
    x = range(len(rows))
    ax_ap.bar([i - 0.2 for i in x], [r["AP"] for r in rows], width=0.4, label="AP")
    ax_ap.bar([i + 0.2 for i in x], [r["AP50"] for r in rows], width=0.4, label="AP50")
    ax_ap.set_xticks(list(x))
    ax_ap.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax_ap.set(title="COCO bbox AP on the val split")
    ax_ap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: List[Dict]) -> str:
    w = max([24] + [len(r["name"]) + 1 for r in rows])
    lines = [f"{'run':<{w}} {'iters':>6} {'AP':>6} {'AP50':>6} {'AP75':>6} {'train time':>11}"]
    for r in rows:
        t = "-" if r["train_s"] is None else f"{r['train_s']:.0f} s"
        lines.append(f"{r['name']:<{w}} {r['iters']:>6} {r['AP']:>6.2f} {r['AP50']:>6.2f} {r['AP75']:>6.2f} {t:>11}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join("output", "det_demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny images and schedules (a minute or two)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--teacher", default="", help="use this trained demo teacher (model_final.pth) instead of training one")
    parser.add_argument("--reviewkd", action="store_true", help="also train a ReviewKD + DeepKD-DKD student")
    parser.add_argument("--diffkd", action="store_true",
                        help="also train a DiffKD student and a DiffKD + DeepKD-DKD student")
    args = parser.parse_args(argv)
    runs = RUNS + ([REVIEWKD_RUN] if args.reviewkd else []) + (DIFFKD_RUNS if args.diffkd else [])

    profile = PROFILES["quick" if args.quick else "default"]
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    # detectron2's logs go to <output>/log.txt; the console gets the demo's own progress lines.
    for name in ("detectron2", "fvcore", "deepkd_det"):
        _file_logger(os.path.join(out, "log.txt"), name)
    data_root = os.path.join(out, "data")
    t0 = time.perf_counter()
    generate_shapes_dataset(data_root, profile["num_train"], profile["num_val"], profile["image_size"], seed=0)
    print(f"[det_demo] shapes data ({profile['num_train']} train / {profile['num_val']} val, "
          f"{profile['image_size']} px) in {data_root}", flush=True)

    rows: List[Dict] = []
    run_dirs: Dict[str, str] = {}
    teacher_weights = ""
    for name, config, schedule in runs:
        iters = profile[f"{schedule}_iters"]
        run_dir = os.path.join(out, _slug(name))
        cfg = build_cfg(config, run_dir, data_root, profile, iters, teacher_weights)
        if name == "student":  # the untrained student: where every student starts
            seed_all_rng(cfg.SEED)
            untrained = DeepKDTrainer.build_model(eval_cfg(cfg))
            rows.append({"name": "student, untrained", "iters": 0, "train_s": None, **evaluate(cfg, untrained)})
            print(f"[det_demo] {'student, untrained':<22} AP {rows[-1]['AP']:.2f}", flush=True)
        if name == "teacher" and args.teacher:
            teacher_weights = os.path.abspath(args.teacher)
            model = DeepKDTrainer.build_model(eval_cfg(cfg))
            DeepKDCheckpointer(model).load(teacher_weights)
            rows.append({"name": name, "iters": 0, "train_s": None, **evaluate(cfg, model)})
            print(f"[det_demo] {name:<22} AP {rows[-1]['AP']:.2f}  (given: {teacher_weights})", flush=True)
            continue
        print(f"[det_demo] training {name} ({config}, {iters} iterations) ...", flush=True)
        seconds, trainer = train_run(cfg)
        ap = evaluate(cfg, trainer.model)
        rows.append({"name": name, "iters": iters, "train_s": seconds, **ap})
        run_dirs[name] = run_dir
        print(f"[det_demo] {name:<22} AP {ap['AP']:.2f}  AP50 {ap['AP50']:.2f}  ({seconds:.0f} s)", flush=True)
        if name == "teacher":
            teacher_weights = os.path.join(run_dir, "model_final.pth")
        del trainer

    table = format_table(rows)
    print("\n" + table, flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"profile": profile, "rows": rows, "total_s": time.perf_counter() - t0}, f, indent=2)
    png = os.path.join(out, "det_demo.png")
    plot(rows, run_dirs, png)
    print(f"\n[det_demo] total {time.perf_counter() - t0:.0f} s; table {os.path.join(out, 'results.json')}, "
          f"figure {png}", flush=True)
    return rows


def _file_logger(path: str, name: str) -> None:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)


if __name__ == "__main__":
    main()
