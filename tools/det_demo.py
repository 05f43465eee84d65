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
diffkd_deepkd_dkd; the other detector families, each with its own teacher and its own vanilla
student (its rows are compared with that one): mask_vanilla, mask_deepkd_dkd (Mask R-CNN, teacher
configs/DEEPKD/demo/teacher-mask.yaml, trained on the shapes' polygons; bbox and segm AP) and
retinanet_vanilla, retinanet_diffkd_deepkd_dkd (RetinaNet, teacher-retinanet.yaml, from a
class-agnostic RetinaNet pre-training of its own). ``--methods`` takes a family's name (faster,
mask, retinanet) for its rows; ``--methods all`` runs every row. Every row is the mean ± std over the seeds
of COCO bbox AP on the val split (detectron2's COCOEvaluator), evaluated every few iterations
during training; the table marks which differences from the vanilla student (and DeepKD-X from
X) exceed the spread, |mean difference| > std_a + std_b. The DeepKD-DKD row measures the GSNR/BSNR
of TOG/TCG/NCG (DEEPKD.GSNR). Writes <output>/results.md, <output>/summary.json and the picture
<output>/det_demo.png (det_demo_<family>.png for the other families; val AP curves with seed bands, per-seed results, the top-k schedule K,
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
# key, label, config file, family
METHODS = (
    ("vanilla", "vanilla", "student-vanilla.yaml", "faster"),
    ("kd", "KD", "student-kd.yaml", "faster"),
    ("deepkd_kd", "DeepKD-KD", "student-deepkd-kd.yaml", "faster"),
    ("dkd", "DKD", "student-dkd.yaml", "faster"),
    ("deepkd_dkd", "DeepKD-DKD", "student-deepkd-dkd.yaml", "faster"),
    ("reviewkd_deepkd_dkd", "ReviewKD + DeepKD-DKD", "student-reviewkd-deepkd.yaml", "faster"),
    ("diffkd", "DiffKD", "student-diffkd.yaml", "faster"),
    ("diffkd_deepkd_dkd", "DiffKD + DeepKD-DKD", "student-diffkd-deepkd.yaml", "faster"),
    ("mask_vanilla", "Mask R-CNN vanilla", "student-mask-vanilla.yaml", "mask"),
    ("mask_deepkd_dkd", "Mask R-CNN DeepKD-DKD", "student-mask-deepkd-dkd.yaml", "mask"),
    ("retinanet_vanilla", "RetinaNet vanilla", "student-retinanet-vanilla.yaml", "retinanet"),
    ("retinanet_diffkd_deepkd_dkd", "RetinaNet DiffKD + DeepKD", "student-retinanet-diffkd-deepkd.yaml", "retinanet"),
)
LABELS = {key: label for key, label, _, _ in METHODS}
CONFIG_OF = {key: config for key, _, config, _ in METHODS}
FAMILY_OF = {key: family for key, _, _, family in METHODS}
# Detector families: each has its own teacher (fine-tuned from the same class-agnostic pre-trained
# detector on all training images) and its own vanilla student; a row is compared with its
# family's vanilla student only. The Faster R-CNN family's teacher keeps the folder "teacher".
FAMILIES = {
    "faster": dict(label="Faster R-CNN", teacher="teacher", config="teacher.yaml", vanilla="vanilla", masks=False,
                   lr_scale=1.0),
    "mask": dict(label="Mask R-CNN", teacher="teacher_mask", config="teacher-mask.yaml", vanilla="mask_vanilla",
                 masks=True, lr_scale=1.0),
    # RetinaNet trains at a quarter of Faster R-CNN's lr here: its teacher at the ReviewKD release's
    # RetinaNet lr (teacher-retinanet.yaml), its students at a quarter of the profile's student_lr.
    "retinanet": dict(label="RetinaNet", teacher="teacher_retinanet", config="teacher-retinanet.yaml",
                      vanilla="retinanet_vanilla", masks=False, lr_scale=0.25),
}
FAMILY_OF_CONFIG = {config: family for _, _, config, family in METHODS}
# The class-agnostic pre-trainings: "pretrain" (the Faster R-CNN every family starts from) and,
# for RetinaNet, "pretrain_retinanet": the RetinaNet from "pretrain"'s backbone and FPN, pre-trained
# class-agnostically on the same images, so that its students, like the R-CNN ones, start with a
# trained head (only the class scores are new). Each writes <folder>/init.pth without its class layer.
PRETRAIN_KEYS = {"pretrain": "faster", "pretrain_retinanet": "retinanet"}
INIT_OF = {"faster": "pretrain", "mask": "pretrain", "retinanet": "pretrain_retinanet"}
TEACHER_KEYS = {f["teacher"]: family for family, f in FAMILIES.items()}
VANILLA_KEYS = tuple(f["vanilla"] for f in FAMILIES.values())
# ``--methods`` also takes a family's name for all its rows.
FAMILY_METHODS = {family: [k for k in LABELS if FAMILY_OF[k] == family] for family in FAMILIES}
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

    from deepkd_det.det.config import (
        add_deepkd_config,
        merge_config_file,
        student_architecture,
        validate_deepkd_config,
    )
    from deepkd_det.det.data import SHAPES_VAL, add_data_config

    p = job["profile"]
    cfg = add_data_config(add_deepkd_config(get_cfg()))
    merge_config_file(cfg, os.path.join(DEMO_CONFIGS, job["config"]))
    cfg.OUTPUT_DIR = job["out_dir"]
    s = cfg.DATASETS.SHAPES
    s.ROOT, s.NUM_TRAIN, s.NUM_VAL, s.IMAGE_SIZE = job["data_root"], p["num_train"], p["num_val"], p["image_size"]
    s.NUM_CLASSES = p["num_classes"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = job["num_classes"]
    if student_architecture(cfg) == "RetinaNet":  # its class count (the teacher's too: resolved from MODEL)
        cfg.MODEL.RETINANET.NUM_CLASSES = job["num_classes"]
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
    lr_scale = FAMILIES[FAMILY_OF_CONFIG[job["config"]]]["lr_scale"] if student else 1.0
    if lr_scale != 1.0:  # the family's students' lr (RetinaNet)
        cfg.SOLVER.BASE_LR *= lr_scale
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
    if job["kind"] in PRETRAIN_KEYS:
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
        evaluated = getattr(trainer, "_last_eval_results", None) or {}
        # No detection at all gives NaN in detectron2's table: 0 here.
        result = {}
        for task, prefix in (("bbox", ""), ("segm", "mask_")):  # segm: Mask R-CNN only
            if task in evaluated or task == "bbox":
                values = evaluated.get(task, {})
                result.update({prefix + k: (float(values[k]) if math.isfinite(values.get(k, float("nan"))) else 0.0)
                               for k in ("AP", "AP50", "AP75")})
        result["train_s"] = seconds
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
    """The pre-trained detector without its class-specific layer: every run's MODEL.WEIGHTS
    (backbone, FPN, RPN and box-head layers; the predictor is initialised for the 6 classes; a
    RetinaNet: backbone, FPN and head without its class-score conv)."""
    from deepkd_det.core.io import atomic_save, load_weights_only

    state = load_weights_only(pretrained)["model"]
    keep = {k: v for k, v in state.items() if not k.startswith(("roi_heads.box_predictor.", "head.cls_score."))}
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
                for key in ("bbox/AP", "segm/AP", "kd/topk_k"):
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
    """One run: ``key`` a pre-training ("pretrain", "pretrain_retinanet"), a family's teacher
    ("teacher", "teacher_mask", ...) or a student method, with its seed; ``teacher_weights``: the
    student's family's teacher."""
    pretrain = key in PRETRAIN_KEYS
    teacher = pretrain or key in TEACHER_KEYS
    family = PRETRAIN_KEYS.get(key) or TEACHER_KEYS.get(key) or FAMILY_OF[key]
    if teacher:  # only what decides this run, so that a change elsewhere keeps it reusable
        ignored = STUDENT_ONLY + (("teacher_iters",) if pretrain else ())
        profile = {k: v for k, v in profile.items() if k not in ignored}
    # Every run starts from its family's pre-training ("pretrain_retinanet" from "pretrain"'s).
    init = "" if key == "pretrain" else data["init_weights"] if pretrain or INIT_OF[family] == "pretrain" else \
        os.path.join(out, INIT_OF[family], "init.pth")
    return {
        "kind": key if teacher else "student",
        "config": FAMILIES[family]["config"] if teacher else CONFIG_OF[key],
        "out_dir": os.path.join(out, key if teacher else os.path.join(key, f"seed{seed}")),
        "data_root": data["root"],
        "train_json": data["pretrain_json"] if pretrain else "" if teacher else data["few_json"],
        "image_dir": data["pretrain_image_dir"] if pretrain else data["image_dir"],
        "num_classes": 1 if pretrain else profile["num_classes"],
        "init_weights": init,
        "profile": profile,
        "iters": profile["pretrain_iters" if pretrain else "teacher_iters" if teacher else "student_iters"],
        "seed": seed,
        "teacher_weights": "" if teacher or key in VANILLA_KEYS else teacher_weights,
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
    if args.methods:  # a family's name stands for its rows
        args.methods = [m for name in args.methods for m in FAMILY_METHODS.get(name, [name])]
    methods, seeds = demo_methods_and_seeds(parser, args, LABELS, DEFAULT_METHODS, QUICK_METHODS)
    families = list(dict.fromkeys(FAMILY_OF[k] for k in methods))
    if args.write_docs == "" and families != ["faster"]:  # never over the Faster R-CNN rows' own block
        args.write_docs = "det_demo_families"
    try:
        docs_targets(args, "det_demo")
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= profile["student_images"] <= profile["num_train"]:
        parser.error(f"student_images must lie in 1..num_train ({profile['num_train']}), got {profile['student_images']}")
    start_s = time.time()

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
    retinanet_pretrain_job = make_job("pretrain_retinanet", 0, profile, out, data, "", [], threads)
    retinanet_init = os.path.join(retinanet_pretrain_job["out_dir"], "init.pth")
    teacher_jobs = {fam: make_job(FAMILIES[fam]["teacher"], 0, profile, out, data, "", [], threads) for fam in families}
    teacher_weights = {fam: os.path.join(job["out_dir"], "model_final.pth") for fam, job in teacher_jobs.items()}
    jobs = {(key, seed): make_job(key, seed, profile, out, data, teacher_weights[FAMILY_OF[key]], args.opts, threads)
            for key in methods for seed in seeds}
    for job in jobs.values():  # refuse bad overrides before anything trains, in one line
        try:
            build_cfg({**job, "teacher_weights": ""})
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            parser.error(f"{job['config']} with the overrides {' '.join(args.opts)}: {exc}")

    def teacher_name(fam: str) -> str:
        return "teacher" if fam == "faster" else f"{FAMILIES[fam]['label']} teacher"

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
            print(f"[det_demo] pre-training done ({time.time() - start_s:.0f} s)", flush=True)
        retinanet_pretrain = None
        if "retinanet" in families:
            if finished_run(retinanet_pretrain_job) and os.path.isfile(retinanet_init):
                print(f"[det_demo] RetinaNet pre-training: reusing {retinanet_init}", flush=True)
            else:  # beside the other families' teachers
                print(f"[det_demo] RetinaNet pre-training: class-agnostic, from the pre-trained backbone and FPN, "
                      f"{profile['pretrain_iters']} iterations on {profile['pretrain_images']} images", flush=True)
                retinanet_pretrain = pool.submit(run_job, retinanet_pretrain_job)
        teachers, pending, futures = {}, {}, {}

        def start(fams):
            """Each family's teacher (reused or submitted); its vanilla students train beside it."""
            for fam in fams:
                teachers[fam] = finished_run(teacher_jobs[fam])
                if teachers[fam]:
                    print(f"[det_demo] {teacher_name(fam)}: reusing {teacher_weights[fam]}", flush=True)
                else:
                    print(f"[det_demo] {teacher_name(fam)}: training ({profile['teacher_iters']} iterations on "
                          f"{profile['num_train']} images)", flush=True)
                    pending[fam] = pool.submit(run_job, teacher_jobs[fam])
            if pending:  # the vanilla students need no teacher
                futures.update({job: pool.submit(run_job, jobs[job]) for job in jobs
                                if job[0] in VANILLA_KEYS and FAMILY_OF[job[0]] in fams})

        start([fam for fam in families if not (fam == "retinanet" and retinanet_pretrain)])
        if retinanet_pretrain:
            retinanet_pretrain.result()
            write_init_weights(os.path.join(retinanet_pretrain_job["out_dir"], "model_final.pth"), retinanet_init)
            print(f"[det_demo] RetinaNet pre-training done ({time.time() - start_s:.0f} s)", flush=True)
            start(["retinanet"])
        for fam in families:
            if fam in pending:
                teachers[fam] = pending[fam].result()
            t = teachers[fam]
            mask = f"  mask AP {t['mask_AP']:.2f}" if "mask_AP" in t else ""
            print(f"[det_demo] {teacher_name(fam)} AP {t['AP']:.2f}{mask}  ({time.time() - start_s:.0f} s)", flush=True)
            futures.update({job: pool.submit(run_job, jobs[job]) for job in jobs
                            if FAMILY_OF[job[0]] == fam and job not in futures})
        results = {}
        for key in methods:
            metrics = ("AP", "AP50", "AP75") + (("mask_AP", "mask_AP50", "mask_AP75") if FAMILIES[FAMILY_OF[key]]["masks"]
                                                else ())
            results[key] = {"label": LABELS[key], **{k: [] for k in metrics}, "train_s": [], "per_seed": [],
                            "diverged": {}}
        for (key, seed), future in futures.items():
            r, row = future.result(), results[key]
            row["train_s"].append(r["train_s"])
            if "diverged" in r:
                row["diverged"][str(seed)] = r["diverged"]
                row["per_seed"].append("diverged")
                print(f"[det_demo] {LABELS[key]:<22} seed {seed}: DIVERGED, {r['diverged']}  "
                      f"({time.time() - start_s:.0f} s in all)", flush=True)
                continue
            for k in row:
                if k.startswith(("AP", "mask_AP")):
                    row[k].append(r[k])
            row["per_seed"].append(f"{r['AP']:.2f}" + (f" / {r['mask_AP']:.2f}" if "mask_AP" in row else ""))
            mask = f"  mask AP {r['mask_AP']:.2f}" if "mask_AP" in row else ""
            print(f"[det_demo] {LABELS[key]:<22} seed {seed}: AP {r['AP']:.2f}  AP50 {r['AP50']:.2f}{mask}  "
                  f"({r['train_s']:.0f} s; {time.time() - start_s:.0f} s in all)", flush=True)
    elapsed = time.time() - start_s

    comparisons = {}

    def versus(key: str, other: str, metric: str = "AP") -> str:
        # Only rows whose every seed finished are compared: a diverged seed has no AP to average.
        if results[key]["diverged"] or results[other]["diverged"]:
            return "n/a (a seed diverged)"
        name = f"{key} - {other}" + ("" if metric == "AP" else f" ({metric.replace('_', ' ')})")
        comparisons[name] = c = compare(results[key][metric], results[other][metric])
        return verdict(c)

    def family_table(fam: str) -> List[str]:
        """One family's rows: its teacher, then each row against the family's vanilla student (bbox
        AP; mask AP too for Mask R-CNN) and, for the Faster R-CNN DeepKD-X rows, against X."""
        f, t = FAMILIES[fam], teachers[fam]
        masks, plain_column, vanilla = f["masks"], fam == "faster", f["vanilla"]
        metrics = ("AP", "AP50", "AP75") + (("mask_AP", "mask_AP50", "mask_AP75") if masks else ())
        head = (["method", "AP", "AP50", "AP75"] + (["mask AP", "mask AP50", "mask AP75"] if masks else [])
                + [f"per seed (AP{' / mask AP' if masks else ''})", "vs vanilla"]
                + (["vs vanilla (mask AP)"] if masks else []) + (["vs plain"] if plain_column else [])
                + ["time (with evals)"])
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        blanks = 1 + masks + plain_column
        name = "teacher" if fam == "faster" else f"{f['label']} teacher"
        rows.append(f"| {name} (all {profile['num_train']} images) | "
                    + " | ".join(f"{t[k]:.2f}" for k in metrics) + " |" + " |" * blanks + f" | {t['train_s']:.0f} s |")
        for key in (k for k in methods if FAMILY_OF[k] == fam):
            r = results[key]
            cells = [fmt_mean_std(r[k]) if r[k] else "-" for k in metrics] + [", ".join(r["per_seed"])]
            cells.append(versus(key, vanilla) if key != vanilla and vanilla in results else "-")
            if masks:
                cells.append(versus(key, vanilla, "mask_AP") if key != vanilla and vanilla in results else "-")
            if plain_column:
                plain = PLAIN_OF.get(key)
                cells.append(f"{versus(key, plain)} vs {LABELS[plain]}" if plain in results else "-")
            cells.append(f"{mean_std(r['train_s'])[0]:.0f} s")
            rows.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        return rows

    if families == ["faster"]:
        teacher = teachers["faster"]
        caption = (f"Shapes {profile['num_classes']} classes, {profile['image_size']} px. Teacher R-18-FPN trained on "
                   f"{profile['num_train']} images ({profile['teacher_iters']} iterations), AP {teacher['AP']:.2f}; "
                   f"students (the same detector) on the first {profile['student_images']} of them, the same for every "
                   f"seed, {profile['student_iters']} iterations of {profile['batch']} images; {profile['num_val']} val "
                   f"images, COCO bbox AP; seeds {seeds}.")
        lines = [caption,
                 "Difference vs the vanilla student (and DeepKD-X vs X): **bold** where |mean difference| > std_a + std_b.",
                 "", *family_table("faster")]
    else:
        caption = (f"Shapes {profile['num_classes']} classes, {profile['image_size']} px; every detector R-18-FPN "
                   f"(64-channel FPN), fine-tuned from one class-agnostic pre-trained Faster R-CNN. Each family's "
                   f"teacher on {profile['num_train']} images ({profile['teacher_iters']} iterations); its students "
                   f"(the teacher's detector) on the first {profile['student_images']} of them, the same for every seed, "
                   f"{profile['student_iters']} iterations of {profile['batch']} images; {profile['num_val']} val images, "
                   f"COCO bbox AP (and segm AP: mask AP); seeds {seeds}.")
        lines = [caption,
                 "Difference vs the vanilla student of the same family (and DeepKD-X vs X): **bold** where "
                 "|mean difference| > std_a + std_b."]
        about = {"faster": "Faster R-CNN",
                 "mask": "Mask R-CNN (the Faster R-CNN with a mask head, trained on the shapes' polygons; the "
                         "students' mask head starts from its initialisation)",
                 "retinanet": "RetinaNet (the same backbone and FPN; head on p2-p5, focal loss; pre-trained class-agnostically as a RetinaNet from the pre-trained backbone and FPN)"}
        for fam in families:
            lines += ["", f"**{about[fam]}**", "", *family_table(fam)]
    diverged = [f"{results[k]['label']} seed {seed}: {msg}" for k in methods for seed, msg in results[k]["diverged"].items()]
    if diverged:
        lines += ["", "Diverged (no AP; excluded from the statistics): " + "; ".join(diverged) + "."]
    lines += ["", f"total time {elapsed:.0f} s"]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"profile": profile, "seeds": seeds, "teacher": teachers.get("faster"), "teachers": teachers,
                   "results": results, "comparisons": comparisons, "total_s": elapsed}, f, indent=2)
    # One picture per family (det_demo.png: Faster R-CNN; det_demo_<family>.png), each against its own vanilla.
    pictures = {}
    for fam in families:
        keys = [k for k in methods if FAMILY_OF[k] == fam]
        fam_results = {k: results[k] for k in keys}
        curves = {key: [read_curves(jobs[key, s]["out_dir"]) for s in seeds if str(s) not in results[key]["diverged"]]
                  for key in keys}
        vanilla = FAMILIES[fam]["vanilla"]
        fam_comparisons = {name.replace(f" - {vanilla}", " - vanilla") if fam != "faster" else name: c
                           for name, c in comparisons.items() if name.split(" - ")[0] in keys and "(" not in name}
        png = os.path.join(out, "det_demo.png" if fam == "faster" else f"det_demo_{fam}.png")
        note = ((caption if fam == "faster" else f"{FAMILIES[fam]['label']} rows. " + caption)
                + " Curves: COCOEvaluator on the val split every "
                f"{profile['eval_period']} iterations. GSNR/BSNR: one {profile['gsnr_window']}-iteration window "
                f"every {profile['gsnr_period']} iterations, mean over the student's parameters.")
        table_lines = picture_table(fam_results, fam_comparisons, LABELS, PLAIN_OF, "AP", "AP (final)")
        # Plain KD / DKD log K too (every non-target class, constant): only the masked runs are drawn.
        plot_report(fam_results, curves, png, metric="AP", curve="bbox/AP", k_curve="kd/topk_k",
                    teacher=teachers[fam]["AP"], unit="COCO bbox AP", x_label="iteration", note=note,
                    table=table_lines, k_keys=[k for k in keys if "deepkd" in k])
        pictures[fam] = png
    print(f"\n[det_demo] table {os.path.join(out, 'results.md')}, picture(s) {', '.join(pictures.values())}", flush=True)
    written = publish_to_docs(args, "det_demo", argv, table, pictures.get("faster"))
    for path in written:
        print(f"[det_demo] wrote the table into {path}", flush=True)
    if written and args.write_docs == "det_demo_families":  # the other families' pictures go next to it
        for fam, png in pictures.items():
            if fam != "faster":
                shutil.copyfile(png, os.path.join(os.path.dirname(os.path.abspath(written[-1])), os.path.basename(png)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
