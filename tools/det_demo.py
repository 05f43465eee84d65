#!/usr/bin/env python
"""Detection demo on the embedded shapes: a few labelled images, a teacher that saw them all (CPU).

The setting where distillation is known to matter: one Faster R-CNN R-18-FPN is pre-trained
class-agnostically on other generated images (the stand-in for ImageNet weights); from it the
teacher (configs/DEEPKD/demo/teacher.yaml) is fine-tuned on the whole generated training split,
each student (the same detector, configs/DEEPKD/demo/student-<method>.yaml) on only its first few
images. The teacher's class scores on the student's proposals of those images (KD on the R-CNN
head logits) carry what it learnt from the rest; the vanilla student has only the few boxes.

    python tools/det_demo.py [--output output/det_demo] [--seeds 0 1 2] [--methods ...] [--jobs 2]
                             [--quick] [--set KEY=VALUE ...] [KEY VALUE ...]

Rows: vanilla, kd, dkd, deepkd_kd, deepkd_dkd (the default set), reviewkd_deepkd_dkd, diffkd,
diffkd_deepkd_dkd (``--methods all`` runs every row). Every row is the mean ± std over the seeds
of COCO bbox AP on the val split (detectron2's COCOEvaluator), evaluated every few iterations
during training; the table marks which differences from the vanilla student (and DeepKD-X from
X) exceed the spread, |mean difference| > std_a + std_b. The DeepKD-DKD row measures the GSNR/BSNR
of TOG/TCG/NCG (DEEPKD.GSNR). Writes <output>/results.md, <output>/summary.json and the picture
<output>/det_demo.png (val AP curves with seed bands, per-seed results, the top-k schedule K,
GSNR and BSNR). A pre-training and a teacher already trained with the same settings in <output>
are reused; a student that diverges is reported as such in the table.
``--quick``: a tiny smoke run (a few iterations, 2 rows, 2 seeds). ``--set`` changes the profile
(e.g. ``--set student_iters=300``); trailing KEY VALUE pairs override every student config.
Whatever the numbers show is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from typing import Dict, List, Optional

# detectron2's imports trip torch's deprecation notes (torch.jit.script, meshgrid): not the user's business.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
for _folder in (REPO, TOOLS):  # run as a script from anywhere; tools/demo_report.py
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

from demo_report import (  # noqa: E402
    add_demo_arguments,
    compare,
    demo_methods_and_seeds,
    demo_pool,
    docs_targets,
    fmt_mean_std,
    mean_std,
    picture_table,
    plot_report,
    publish_to_docs,
    verdict,
)

DEMO_CONFIGS = os.path.join(REPO, "configs", "DEEPKD", "demo")
# key, label, config file
METHODS = (
    ("vanilla", "vanilla", "student-vanilla.yaml"),
    ("kd", "KD", "student-kd.yaml"),
    ("deepkd_kd", "DeepKD-KD", "student-deepkd-kd.yaml"),
    ("dkd", "DKD", "student-dkd.yaml"),
    ("deepkd_dkd", "DeepKD-DKD", "student-deepkd-dkd.yaml"),
    ("reviewkd_deepkd_dkd", "ReviewKD + DeepKD-DKD", "student-reviewkd-deepkd.yaml"),
    ("diffkd", "DiffKD", "student-diffkd.yaml"),
    ("diffkd_deepkd_dkd", "DiffKD + DeepKD-DKD", "student-diffkd-deepkd.yaml"),
)
LABELS = {key: label for key, label, _ in METHODS}
CONFIG_OF = {key: config for key, _, config in METHODS}
DEFAULT_METHODS = ("vanilla", "kd", "deepkd_kd", "dkd", "deepkd_dkd")
QUICK_METHODS = ("vanilla", "deepkd_dkd")
# DeepKD-X is compared with X as well as with the vanilla student.
PLAIN_OF = {"deepkd_kd": "kd", "deepkd_dkd": "dkd", "reviewkd_deepkd_dkd": "deepkd_dkd",
            "diffkd_deepkd_dkd": "diffkd"}
# Rows whose GSNR/BSNR is measured (GSNR keeps TOG and NCG apart, so it would cost DeepKD-KD its
# merged buffer: measured on DeepKD-DKD only).
GSNR_METHODS = ("deepkd_dkd",)

PROFILES = {
    # Six shape classes (pentagon, hexagon and circle look alike at this size), 64 px images; students
    # on 10 labelled images (about 25 boxes, four per class), the teacher on 300.
    "default": dict(num_classes=6, image_size=64, num_train=300, num_val=100, student_images=10, batch=4,
                    pretrain_images=300, pretrain_iters=800, teacher_iters=500, student_iters=150,
                    student_lr=0.01, eval_period=50, gsnr_period=50, gsnr_window=5),
    "quick": dict(num_classes=6, image_size=64, num_train=12, num_val=6, student_images=6, batch=2,
                  pretrain_images=8, pretrain_iters=6, teacher_iters=12, student_iters=8,
                  student_lr=0.005, eval_period=4, gsnr_period=4, gsnr_window=2),
}
# Profile entries that only the students' runs read (a change of them keeps the teacher).
STUDENT_ONLY = ("student_images", "student_iters", "student_lr", "eval_period", "gsnr_period", "gsnr_window")
WRITER_PERIOD = 5  # metrics.json rows every 5 iterations (detectron2's default is 20)
LOGGERS = ("detectron2", "fvcore", "deepkd_det")


# ------------------------------------------------------------------------------------- one run
def _file_logger(path: str, name: str) -> None:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)


def build_cfg(job: Dict):
    """The detectron2 config of one demo run (``job``: see ``make_job``)."""
    from detectron2.config import get_cfg

    from deepkd_det.det.config import add_deepkd_config, merge_config_file, validate_deepkd_config
    from deepkd_det.det.data import SHAPES_VAL, add_data_config

    p = job["profile"]
    cfg = add_data_config(add_deepkd_config(get_cfg()))
    merge_config_file(cfg, os.path.join(DEMO_CONFIGS, job["config"]))
    cfg.OUTPUT_DIR = job["out_dir"]
    s = cfg.DATASETS.SHAPES
    s.ROOT, s.NUM_TRAIN, s.NUM_VAL, s.IMAGE_SIZE = job["data_root"], p["num_train"], p["num_val"], p["image_size"]
    s.NUM_CLASSES = p["num_classes"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = job["num_classes"]
    if job["train_json"]:  # the students' few images, the pre-training set: COCO jsons of their own
        cfg.DATASETS.REGISTER = [["deepkd_shapes_demo_train", job["train_json"], job["image_dir"]]]
        cfg.DATASETS.TRAIN = ("deepkd_shapes_demo_train",)
    cfg.MODEL.WEIGHTS = job["init_weights"]
    size = p["image_size"]
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size, size
    # Pre-training and teacher: the linear scaling rule (the demo configs' lr is for 8 images per
    # batch). Students: the profile's lr for its batch (they fine-tune the pre-trained detector).
    student = job["kind"] == "student"
    cfg.SOLVER.BASE_LR = p["student_lr"] if student else cfg.SOLVER.BASE_LR * p["batch"] / cfg.SOLVER.IMS_PER_BATCH
    cfg.SOLVER.IMS_PER_BATCH = p["batch"]
    iters = job["iters"]
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.STEPS = (int(iters * 0.8),)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(iters // 5, 1))
    cfg.KD.WARMUP_ITERS = min(cfg.KD.WARMUP_ITERS, max(iters // 5, 1))
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9  # only model_final
    cfg.DATASETS.TEST = (SHAPES_VAL,)
    # Students: val AP curves; the teacher: evaluated once, at the end; the class-agnostic
    # pre-training: nothing to evaluate on.
    cfg.TEST.EVAL_PERIOD = p["eval_period"] if student else iters
    if job["kind"] == "pretrain":
        cfg.DATASETS.TEST, cfg.TEST.EVAL_PERIOD = (), 0
    cfg.SEED = job["seed"]
    if job["teacher_weights"]:
        cfg.TEACHER.MODEL.WEIGHTS = job["teacher_weights"]
    if job["gsnr"]:
        cfg.DEEPKD.GSNR.ENABLED = True
        cfg.DEEPKD.GSNR.PERIOD, cfg.DEEPKD.GSNR.WINDOW = p["gsnr_period"], p["gsnr_window"]
    cfg.merge_from_list(list(job["opts"]))
    validate_deepkd_config(cfg)
    cfg.freeze()
    return cfg


def run_job(job: Dict) -> Dict:
    """Train one run (seeded) in ``job["out_dir"]``: the pre-training from scratch, the teacher and
    the students from the pre-trained weights; returns the final val AP and the run's time
    (training and its periodic evaluations).

    Runs in a worker process (or inline with --jobs 1) with ``job["threads"]`` torch threads;
    detectron2's logs go to <out_dir>/log.txt, pycocotools' prints are swallowed.
    """
    import torch
    from detectron2.engine import hooks
    from detectron2.utils.env import seed_all_rng

    import deepkd_det.det.modeling  # noqa: F401  (registers DeepKDRCNN)
    from deepkd_det.core.io import atomic_write_json
    from deepkd_det.det.engine import DeepKDTrainer

    before = torch.get_num_threads()
    torch.set_num_threads(job["threads"])
    out_dir = job["out_dir"]
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics.json appends: start clean
    os.makedirs(out_dir)
    for name in LOGGERS:
        _file_logger(os.path.join(out_dir, "log.txt"), name)
    try:
        cfg = build_cfg(job)
        seed_all_rng(cfg.SEED)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = DeepKDTrainer(cfg)
            trainer.resume_or_load(resume=False)
            for h in trainer._hooks:
                if isinstance(h, hooks.PeriodicWriter):
                    h._period = WRITER_PERIOD
            start = time.perf_counter()
            try:
                trainer.train()
            except FloatingPointError as exc:
                if job["kind"] != "student":  # every student needs the pre-training and the teacher
                    raise
                # A diverged student is a result (shown in the table), not the end of the demo.
                return {"diverged": str(exc).split(" (")[0], "train_s": time.perf_counter() - start}
            seconds = time.perf_counter() - start
        box = (getattr(trainer, "_last_eval_results", None) or {}).get("bbox", {})
        # No detection at all gives NaN in detectron2's table: 0 here.
        ap = {k: (float(box[k]) if math.isfinite(box.get(k, float("nan"))) else 0.0) for k in ("AP", "AP50", "AP75")}
        result = {**ap, "train_s": seconds}
        # Written last (atomically): it marks the run as finished, for reuse.
        atomic_write_json(os.path.join(out_dir, "demo_job.json"), {"job": job_identity(job), "result": result})
        return result
    finally:
        torch.set_num_threads(before)
        for name in LOGGERS:
            for h in list(logging.getLogger(name).handlers):
                if isinstance(h, logging.FileHandler) and h.baseFilename == os.path.join(out_dir, "log.txt"):
                    logging.getLogger(name).removeHandler(h)
                    h.close()


def job_identity(job: Dict) -> Dict:
    """What decides a run's result (not where it runs or how many threads it has)."""
    return {k: v for k, v in job.items() if k != "threads"}


def finished_run(job: Dict) -> Optional[Dict]:
    """The result of a finished run of exactly this job in its folder, else None."""
    try:
        with open(os.path.join(job["out_dir"], "demo_job.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    same = saved.get("job") == json.loads(json.dumps(job_identity(job)))
    return saved["result"] if same and os.path.isfile(os.path.join(job["out_dir"], "model_final.pth")) else None


# ------------------------------------------------------------------------------------- data
def write_first_images(json_file: str, count: int, out_file: str) -> str:
    """A COCO json of the first ``count`` images of ``json_file`` and their annotations."""
    from deepkd_det.core.io import atomic_write_json

    with open(json_file) as f:
        data = json.load(f)
    images = data["images"][:count]
    keep = {im["id"] for im in images}
    subset = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    subset["info"] = {**data.get("info", {}), "description": f"first {count} images of {os.path.basename(json_file)}"}
    atomic_write_json(out_file, subset)
    return out_file


def write_class_agnostic(json_file: str, out_file: str) -> str:
    """The COCO json ``json_file`` with every object of one category, "shape"."""
    from deepkd_det.core.io import atomic_write_json

    with open(json_file) as f:
        data = json.load(f)
    data["annotations"] = [{**a, "category_id": 1} for a in data["annotations"]]
    data["categories"] = [{"id": 1, "name": "shape", "supercategory": "shape"}]
    data["info"] = {**data.get("info", {}), "description": f"{os.path.basename(json_file)}, class-agnostic"}
    atomic_write_json(out_file, data)
    return out_file


def write_init_weights(pretrained: str, out_file: str) -> str:
    """The pre-trained detector without its class-specific box predictor: every run's MODEL.WEIGHTS
    (backbone, FPN, RPN and box-head layers; the predictor is initialised for the 6 classes)."""
    from deepkd_det.core.io import atomic_save, load_weights_only

    state = load_weights_only(pretrained)["model"]
    keep = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor.")}
    atomic_save({"model": keep, "__author__": "tools/det_demo.py (class-agnostic pre-training)"}, out_file)
    return out_file


# ------------------------------------------------------------------------------------- curves
def read_curves(run_dir: str) -> Dict[str, list]:
    """Curves of one run: val AP and K per iteration (metrics.json), GSNR/BSNR (gsnr_per_layer.jsonl)."""
    curves: Dict[str, list] = {}
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                for key in ("bbox/AP", "kd/topk_k"):
                    if key in row:  # no detection at all: NaN in detectron2's table, 0 here
                        value = row[key] if math.isfinite(row[key]) else 0.0
                        curves.setdefault(key, []).append((row["iteration"] + 1, value))
    path = os.path.join(run_dir, "gsnr_per_layer.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                for key, value in row.items():
                    if key.startswith(("gsnr/", "bsnr/")) and key.count("/") == 1:
                        curves.setdefault(key, []).append((row["iter"] + 1, value))
    return curves


# ------------------------------------------------------------------------------------- main
def _parse_set(items: List[str], profile: Dict, parser) -> Dict:
    profile = dict(profile)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in profile:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(profile)}")
        kind = type(profile[key])
        try:
            profile[key] = kind(value)
        except ValueError:
            parser.error(f"--set {item!r}: {key} takes {'an integer' if kind is int else 'a number'}")
    return profile


def make_job(key: str, seed: int, profile: Dict, out: str, data: Dict, teacher_weights: str, opts, threads: int):
    """One run: ``key`` "pretrain", "teacher" or a student method, with its seed."""
    teacher = key in ("teacher", "pretrain")
    if teacher:  # only what decides this run, so that a change elsewhere keeps it reusable
        ignored = STUDENT_ONLY + (("teacher_iters",) if key == "pretrain" else ())
        profile = {k: v for k, v in profile.items() if k not in ignored}
    return {
        "kind": key if teacher else "student",
        "config": "teacher.yaml" if teacher else CONFIG_OF[key],
        "out_dir": os.path.join(out, key if teacher else os.path.join(key, f"seed{seed}")),
        "data_root": data["root"],
        "train_json": {"teacher": "", "pretrain": data["pretrain_json"]}.get(key, data["few_json"]),
        "image_dir": data["pretrain_image_dir"] if key == "pretrain" else data["image_dir"],
        "num_classes": 1 if key == "pretrain" else profile["num_classes"],
        "init_weights": "" if key == "pretrain" else data["init_weights"],
        "profile": profile,
        "iters": profile[f"{key}_iters" if teacher else "student_iters"],
        "seed": seed,
        "teacher_weights": "" if teacher or key == "vanilla" else teacher_weights,
        "gsnr": key in GSNR_METHODS,
        "opts": [] if teacher else list(opts),
        "threads": threads,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="output folder (default output/det_demo, or output/det_demo_quick)")
    add_demo_arguments(parser, LABELS, DEFAULT_METHODS)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"change the profile ({', '.join(PROFILES['default'])})")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for the student configs")
    args = parser.parse_args(argv)
    profile = _parse_set(args.set, PROFILES["quick" if args.quick else "default"], parser)
    out = os.path.abspath(args.output or os.path.join("output", "det_demo_quick" if args.quick else "det_demo"))
    methods, seeds = demo_methods_and_seeds(parser, args, LABELS, DEFAULT_METHODS, QUICK_METHODS)
    try:
        docs_targets(args, "det_demo")
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= profile["student_images"] <= profile["num_train"]:
        parser.error(f"student_images must lie in 1..num_train ({profile['num_train']}), got {profile['student_images']}")
    start = time.time()

    from deepkd_det.det.data import generate_shapes_dataset

    os.makedirs(out, exist_ok=True)
    data_root = os.path.join(out, "data")
    paths = generate_shapes_dataset(data_root, profile["num_train"], profile["num_val"], profile["image_size"],
                                    seed=0, num_classes=profile["num_classes"])
    train_json, image_dir = paths["train"]
    few_json = write_first_images(train_json, profile["student_images"],
                                  os.path.join(data_root, "annotations", f"instances_train_first{profile['student_images']}.json"))
    # Pre-training images: another seed (no image of the detection splits), boxes without classes.
    pre_root = os.path.join(out, "data_pretrain")
    pre_json, pre_dir = generate_shapes_dataset(pre_root, profile["pretrain_images"], 1, profile["image_size"],
                                                seed=1, num_classes=profile["num_classes"])["train"]
    pre_json = write_class_agnostic(pre_json, os.path.join(pre_root, "annotations", "instances_train_agnostic.json"))
    data = {"root": data_root, "few_json": few_json, "image_dir": image_dir, "pretrain_json": pre_json,
            "pretrain_image_dir": pre_dir, "init_weights": os.path.join(out, "pretrain", "init.pth")}
    print(f"[det_demo] shapes data: {profile['num_classes']} classes, {profile['image_size']} px; class-agnostic "
          f"pre-training on {profile['pretrain_images']} other images; teacher on {profile['num_train']} training "
          f"images, students on the first {profile['student_images']}; {profile['num_val']} val images "
          f"({data_root})", flush=True)

    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    pretrain_job = make_job("pretrain", 0, profile, out, data, "", [], threads)
    teacher_job = make_job("teacher", 0, profile, out, data, "", [], threads)
    teacher_weights = os.path.join(teacher_job["out_dir"], "model_final.pth")
    jobs = {(key, seed): make_job(key, seed, profile, out, data, teacher_weights, args.opts, threads)
            for key in methods for seed in seeds}
    for job in jobs.values():  # refuse bad overrides before anything trains, in one line
        try:
            build_cfg({**job, "teacher_weights": ""})
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            parser.error(f"{job['config']} with the overrides {' '.join(args.opts)}: {exc}")
    # Small detectors on a 2-core machine: one thread per run, runs side by side.
    pool = demo_pool(args.jobs)
    with pool:
        if finished_run(pretrain_job) and os.path.isfile(data["init_weights"]):
            print(f"[det_demo] pre-training: reusing {data['init_weights']}", flush=True)
        else:
            print(f"[det_demo] pre-training: class-agnostic detector, {profile['pretrain_iters']} iterations on "
                  f"{profile['pretrain_images']} images", flush=True)
            pool.submit(run_job, pretrain_job).result()
            write_init_weights(os.path.join(pretrain_job["out_dir"], "model_final.pth"), data["init_weights"])
            print(f"[det_demo] pre-training done ({time.time() - start:.0f} s)", flush=True)
        teacher = finished_run(teacher_job)
        futures = {}
        if teacher:
            print(f"[det_demo] teacher: reusing {teacher_weights}", flush=True)
        else:
            print(f"[det_demo] teacher: training ({profile['teacher_iters']} iterations on {profile['num_train']} "
                  f"images)", flush=True)
            pending = pool.submit(run_job, teacher_job)
            # The vanilla students need no teacher: they train beside it.
            futures = {job: pool.submit(run_job, jobs[job]) for job in jobs if job[0] == "vanilla"}
            teacher = pending.result()
        print(f"[det_demo] teacher AP {teacher['AP']:.2f}  ({time.time() - start:.0f} s)", flush=True)
        futures.update({job: pool.submit(run_job, jobs[job]) for job in jobs if job not in futures})
        results = {key: {"label": LABELS[key], "AP": [], "AP50": [], "AP75": [], "train_s": [], "per_seed": [],
                         "diverged": {}} for key in methods}
        for (key, seed), future in futures.items():
            r, row = future.result(), results[key]
            row["train_s"].append(r["train_s"])
            if "diverged" in r:
                row["diverged"][str(seed)] = r["diverged"]
                row["per_seed"].append("diverged")
                print(f"[det_demo] {LABELS[key]:<22} seed {seed}: DIVERGED, {r['diverged']}  "
                      f"({time.time() - start:.0f} s in all)", flush=True)
                continue
            for k in ("AP", "AP50", "AP75"):
                row[k].append(r[k])
            row["per_seed"].append(f"{r['AP']:.2f}")
            print(f"[det_demo] {LABELS[key]:<22} seed {seed}: AP {r['AP']:.2f}  AP50 {r['AP50']:.2f}  "
                  f"({r['train_s']:.0f} s; {time.time() - start:.0f} s in all)", flush=True)
    elapsed = time.time() - start

    caption = (f"Shapes {profile['num_classes']} classes, {profile['image_size']} px. Teacher R-18-FPN trained on "
               f"{profile['num_train']} images ({profile['teacher_iters']} iterations), AP {teacher['AP']:.2f}; "
               f"students (the same detector) on the first {profile['student_images']} of them, the same for every "
               f"seed, {profile['student_iters']} iterations of {profile['batch']} images; {profile['num_val']} val "
               f"images, COCO bbox AP; seeds {seeds}.")
    lines = [caption,
             "Difference vs the vanilla student (and DeepKD-X vs X): **bold** where |mean difference| > std_a + std_b.",
             "",
             "| method | AP | AP50 | AP75 | per seed (AP) | vs vanilla | vs plain | time (with evals) |",
             "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher (all {profile['num_train']} images) | {teacher['AP']:.2f} | {teacher['AP50']:.2f} | "
                 f"{teacher['AP75']:.2f} | | | | {teacher['train_s']:.0f} s |")
    comparisons = {}

    def versus(key: str, other: str) -> str:
        # Only rows whose every seed finished are compared: a diverged seed has no AP to average.
        if results[key]["diverged"] or results[other]["diverged"]:
            return "n/a (a seed diverged)"
        comparisons[f"{key} - {other}"] = c = compare(results[key]["AP"], results[other]["AP"])
        return verdict(c)

    for key in methods:
        r = results[key]
        vs_van = versus(key, "vanilla") if key != "vanilla" and "vanilla" in results else "-"
        plain = PLAIN_OF.get(key)
        vs_plain = f"{versus(key, plain)} vs {LABELS[plain]}" if plain in results else "-"
        stats = [fmt_mean_std(r[k]) if r[k] else "-" for k in ("AP", "AP50", "AP75")]
        lines.append(f"| {r['label']} | {' | '.join(stats)} | {', '.join(r['per_seed'])} | {vs_van} | {vs_plain} | "
                     f"{mean_std(r['train_s'])[0]:.0f} s |")
    diverged = [f"{results[k]['label']} seed {seed}: {msg}" for k in methods for seed, msg in results[k]["diverged"].items()]
    if diverged:
        lines += ["", "Diverged (no AP; excluded from the statistics): " + "; ".join(diverged) + "."]
    lines += ["", f"total time {elapsed:.0f} s"]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"profile": profile, "seeds": seeds, "teacher": teacher, "results": results,
                   "comparisons": comparisons, "total_s": elapsed}, f, indent=2)
    curves = {key: [read_curves(jobs[key, s]["out_dir"]) for s in seeds if str(s) not in results[key]["diverged"]]
              for key in methods}
    png = os.path.join(out, "det_demo.png")
    note = caption + (" Curves: COCOEvaluator on the val split every "
                      f"{profile['eval_period']} iterations. GSNR/BSNR: one {profile['gsnr_window']}-iteration window "
                      f"every {profile['gsnr_period']} iterations, mean over the student's parameters.")
    table_lines = picture_table(results, comparisons, LABELS, PLAIN_OF, "AP", "AP (final)")
    # Plain KD / DKD log K too (every non-target class, constant): only the masked runs are drawn.
    plot_report(results, curves, png, metric="AP", curve="bbox/AP", k_curve="kd/topk_k", teacher=teacher["AP"],
                unit="COCO bbox AP", x_label="iteration", note=note, table=table_lines,
                k_keys=[k for k in methods if "deepkd" in k])
    print(f"\n[det_demo] table {os.path.join(out, 'results.md')}, picture {png}", flush=True)
    for path in publish_to_docs(args, "det_demo", argv, table, png):
        print(f"[det_demo] wrote the table into {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
