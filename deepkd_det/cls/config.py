"""Configuration of the classification trainer: yacs defaults, ``_BASE_`` files, validation.

``get_cfg()`` returns the defaults; ``load_cfg(path, opts)`` merges a yaml file (following its
``_BASE_`` chain, paths relative to the file) and ``KEY VALUE`` overrides, then validates the
result. Unknown keys and contradictory settings raise :class:`ConfigError` at start-up.
"""

from __future__ import annotations

import difflib
import os
from typing import Iterable, List, Optional

from yacs.config import CfgNode as CN

from deepkd_det.core.amp import AMP_DTYPES
from deepkd_det.core.cfgfile import ConfigError, merge_opts
from deepkd_det.core.cfgfile import merge_file as _merge_file
from deepkd_det.core.crld import CRLD_DEFAULTS, CRLD_TAU_STRONG, CRLD_TAU_WEAK
from deepkd_det.core.mlkd import MLKD_DEFAULTS, MLKD_TEMPERATURES
from deepkd_det.core.settings import OPTIMIZERS, deepkd_node, validate_deepkd_settings
from deepkd_det.core.settings import build_topk_schedule as core_topk_schedule

__all__ = ["ConfigError", "get_cfg", "load_cfg", "validate_cfg", "experiment_name", "output_dir",
           "DATASET_TYPES", "DISTILLER_TYPES", "NUM_CLASSES", "OPTIMIZERS", "STRONG_AUGS"]

DATASET_TYPES = ("digits", "cifar100", "imagenet")
DISTILLER_TYPES = ("NONE", "KD", "DKD", "MLKD", "CRLD", "DIFFKD", "REVIEWKD")
STRONG_AUGS = ("autoaugment", "randaugment")
NUM_CLASSES = {"digits": 10, "cifar100": 100, "imagenet": 1000}
_DEFAULT_ROOTS = {"digits": "", "cifar100": "datasets/cifar100", "imagenet": "datasets/imagenet"}


_C = CN()
_C.SEED = 0
_C.DEVICE = "auto"  # "auto" (cuda when available), "cpu", "cuda"
_C.DETERMINISTIC = False  # torch.use_deterministic_algorithms (slower on GPU)
_C.OUTPUT_DIR = ""  # empty: <EXPERIMENT.OUTPUT_ROOT>/<DATASET.TYPE>/<experiment name>

_C.EXPERIMENT = CN()
_C.EXPERIMENT.NAME = ""  # empty: derived from method, teacher and student
_C.EXPERIMENT.OUTPUT_ROOT = "output/cls"

_C.DATASET = CN()
_C.DATASET.TYPE = "digits"
_C.DATASET.ROOT = ""  # empty: datasets/cifar100 or datasets/imagenet
_C.DATASET.DOWNLOAD = False  # CIFAR-100 only; needs network access
_C.DATASET.NUM_WORKERS = 2
_C.DATASET.TEST_BATCH_SIZE = 128
_C.DATASET.DIGITS = CN()
_C.DATASET.DIGITS.SIZE = 16  # the 8x8 images are upsampled to SIZE x SIZE, 3 channels
_C.DATASET.DIGITS.VAL_FRACTION = 0.3  # stratified, deterministic split
_C.DATASET.DIGITS.SPLIT_SEED = 0
_C.DATASET.DIGITS.TRAIN_LIMIT = 0  # keep only this many training images (0: all)
_C.DATASET.DIGITS.TRAIN_PER_CLASS = 0  # keep this many training images per class (0: all; whole-split normalisation)
# Strong view of the two-view methods (MLKD, CRLD), on top of the weak crop/flip: torchvision's
# AutoAugment (CIFAR10 policy for CIFAR-sized input, ImageNet policy for ImageNet) or RandAugment.
_C.DATASET.STRONG_AUG = "autoaugment"

_C.DISTILLER = CN()
_C.DISTILLER.TYPE = "NONE"  # NONE (cross-entropy only), KD, DKD, MLKD, CRLD, DIFFKD, REVIEWKD
_C.DISTILLER.TEACHER = ""
_C.DISTILLER.STUDENT = "resnet8"
_C.DISTILLER.LOGIT_STAND = False  # logit standardisation of both logits before the KD terms

_C.TEACHER = CN()
_C.TEACHER.CKPT = ""  # explicit file; empty: <TEACHER.ROOT>/<teacher>_vanilla/ckpt_epoch_240.pth
_C.TEACHER.ROOT = "pretrained/cifar_teachers"
_C.TEACHER.FOLD_BN = True  # fold the frozen teacher's batch-norm into its convolutions

# Fine-tuning (the GPD release's third scenario, --load_tiny_model_file_path): the student starts from
# these weights (a student checkpoint, loaded strictly as a teacher is: {"model"} / {"state_dict"} /
# plain, "module." stripped), before GPD widens it (the dynamic teacher then starts as the same
# function through IR; CBR must use GPD.CBR_INIT single). Empty: a random student.
_C.FINETUNE = CN()
_C.FINETUNE.STUDENT_WEIGHTS = ""

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 240
_C.SOLVER.BATCH_SIZE = 64  # global batch; split evenly over the workers
_C.SOLVER.LR = 0.05
_C.SOLVER.LR_SCHEDULER = "step"  # "step" (LR_DECAY_STAGES) or "cosine"
_C.SOLVER.LR_DECAY_STAGES = [150, 180, 210]  # epochs (0-based) from which lr is multiplied once more
_C.SOLVER.LR_DECAY_RATE = 0.1
_C.SOLVER.MIN_LR = 0.0  # cosine floor
_C.SOLVER.WARMUP_EPOCHS = 0.0  # linear lr warm-up
_C.SOLVER.WEIGHT_DECAY = 5e-4
_C.SOLVER.MOMENTUM = 0.9
# "sgd" (momentum SGD; DeepKD's decoupled optimizers are SGD) or "adamw" (torch AdamW, betas 0.9 / 0.999,
# eps 1e-8: the DeiT / RVT recipe of the GPD release's transformers; plain training only)
_C.SOLVER.OPTIMIZER = "sgd"

_C.KD = CN()
_C.KD.TEMPERATURE = 4.0
_C.KD.CE_WEIGHT = 0.1
_C.KD.KD_WEIGHT = 0.9
_C.KD.WARMUP = 0.0  # epochs of linear warm-up of the KD term

_C.DKD = CN()
_C.DKD.CE_WEIGHT = 1.0
_C.DKD.ALPHA = 1.0
_C.DKD.BETA = 8.0
_C.DKD.T = 4.0
_C.DKD.WARMUP = 20.0  # epochs

# MLKD (Jin et al., CVPR 2023; core.mlkd): weak and strong views, instance/batch/class alignment.
_C.MLKD = CN()
_C.MLKD.CE_WEIGHT = MLKD_DEFAULTS["ce_weight"]  # (core.mlkd.MLKD_DEFAULTS: the MLKD release's)
_C.MLKD.KD_WEIGHT = MLKD_DEFAULTS["kd_weight"]
_C.MLKD.TEMPERATURES = list(MLKD_TEMPERATURES)  # prediction augmentation: every term summed over these
_C.MLKD.SPLIT = MLKD_DEFAULTS["split"]  # kd: exact TCKD/NCKD split (plain MLKD is the sum); dkd: alpha TCKD, beta NCKD
_C.MLKD.ALPHA = MLKD_DEFAULTS["alpha"]  # SPLIT dkd only
_C.MLKD.BETA = MLKD_DEFAULTS["beta"]
_C.MLKD.WARMUP = 0.0  # epochs of linear warm-up of the TCKD/NCKD terms
_C.MLKD.CONFIDENCE_MASK = "release"  # release, row or none (core.views)

# CRLD (ACM MM 2024; core.crld): within-view and cross-view KD gated by teacher confidence.
_C.CRLD = CN()
_C.CRLD.CE_WEIGHT = CRLD_DEFAULTS["ce_weight"]  # (core.crld.CRLD_DEFAULTS)
_C.CRLD.WITHIN_WEIGHT = CRLD_DEFAULTS["within_weight"]
_C.CRLD.CROSS_WEIGHT = CRLD_DEFAULTS["cross_weight"]
_C.CRLD.T = CRLD_DEFAULTS["temperature"]
_C.CRLD.TAU_WEAK = CRLD_TAU_WEAK  # teacher confidence threshold of the within-view terms (weak view)
_C.CRLD.TAU_STRONG = CRLD_TAU_STRONG  # ... of the cross-view terms (strong view)
_C.CRLD.SPLIT = CRLD_DEFAULTS["split"]  # kd: exact split (plain CRLD is the sum); dkd: alpha TCKD, beta NCKD
_C.CRLD.ALPHA = CRLD_DEFAULTS["alpha"]
_C.CRLD.BETA = CRLD_DEFAULTS["beta"]
_C.CRLD.WARMUP = 0.0  # epochs
_C.CRLD.CONFIDENCE_MASK = "row"  # row (per sample, the paper); release (kept fraction); none

# DiffKD (Huang et al., NeurIPS 2023; core.diffkd, cls/distillers/diffkd.py): the student's
# pre-pooling feature map and its logits are denoised by diffusion models trained on the
# teacher's, then compared with the teacher's (MSE; KL at T = 1). Weights: paper, all 1.
_C.DIFFKD = CN()
_C.DIFFKD.CE_WEIGHT = 1.0
_C.DIFFKD.FEATURE_WEIGHT = 1.0  # MSE(denoised student map, teacher map); 0: no feature DiffKD
_C.DIFFKD.LOGIT_WEIGHT = 1.0  # KL(teacher || denoised student logits), split into TCKD + NCKD; 0: none
_C.DIFFKD.DIFF_WEIGHT = 1.0  # each diffusion (noise-prediction) loss
_C.DIFFKD.AE_WEIGHT = 1.0  # autoencoder reconstruction (with AE_CHANNELS)
_C.DIFFKD.AE_CHANNELS = 0  # latent channels of the teacher-map autoencoder; 0: none (paper: 1024 for)
_C.DIFFKD.INFERENCE_STEPS = 5  # DDIM steps (paper and release)
_C.DIFFKD.WARMUP = 0.0  # epochs of linear warm-up of the two KD terms

# ReviewKD (Chen et al., CVPR 2021; core.reviewkd, cls/distillers/reviewkd.py): ABF review path over the
# stage outputs + pooled feature, HCL against the teacher's pre-ReLU levels. Defaults: mdistiller's
# CIFAR-100 recipe; the ImageNet configs (the ReviewKD / GPD releases) set WARMUP 0, STUDENT_PREACT True.
_C.REVIEWKD = CN()
_C.REVIEWKD.CE_WEIGHT = 1.0
_C.REVIEWKD.WEIGHT = 1.0  # weight of HCL
_C.REVIEWKD.WARMUP = 20.0  # epochs of linear warm-up of HCL
_C.REVIEWKD.STUDENT_PREACT = False  # the student's levels before their last ReLU (the teacher's always are)
_C.REVIEWKD.MID_CHANNELS = 0  # 0: min(512, the student's last level's channels), mdistiller's rule

# The DeepKD node shared with the detector (deepkd_det/core/settings.py documents every key):
# ENABLED, DECOUPLE, OPTIMIZER (deepkd | dot), COMPAT (paper | official), DELTA_TOG/TCG/NCG,
# DOT_DELTA, DAMPENING, GRAD_STRATEGY, TOPK.*, GSNR.*.
_C.DEEPKD = deepkd_node(CN)

# Mixed precision: the forward (student and teacher) under autocast. "bf16" needs nothing else;
# "fp16" adds one gradient scaler over every loss component (deepkd_det/core/amp.py).
_C.AMP = CN()
_C.AMP.ENABLED = False
_C.AMP.DTYPE = "fp16"  # as detectron2's SOLVER.AMP (DTYPE there too)

# GPD (Guo et al., ICLR 2025; core.gpd, docs/gpd.md): a dynamic teacher, the student widened RATIO
# times and sharing its weights, trained with it. With DISTILLER.TYPE DKD both widths learn from the
# static teacher too (the release); with NONE it is GPD from scratch (CE + the dynamic teacher only).
_C.GPD = CN()
_C.GPD.ENABLED = False
_C.GPD.RATIO = 2  # dynamic-teacher width / student width (released: 2)
_C.GPD.CBR = True  # channel-branch reparameterization of the 3x3 stride-1 convs (released: on)
_C.GPD.BRANCHES = 6  # CBR branches: the released six (origin, avg, prior, 1x1-kxk, kxk, dw-pw); fixed
_C.GPD.CBR_INIT = "multi"  # multi: released from-scratch init; single: keeps a pretrained student's function
_C.GPD.KD_RATIO = 3.0  # weight of the dynamic teacher -> student soft-target loss (released: 3)
_C.GPD.SMOOTHING = 0.1  # label smoothing of that soft-target loss (released: 0.1)
_C.GPD.DYNAMIC_TEACHER_STATIC_KD = True  # the dynamic teacher also learns from the static teacher (DKD)
_C.GPD.CLIP_GRAD_NORM = 5.0  # norm clip of the summed gradient (released: 5); 0 disables
# With DeepKD: "task" puts the dynamic teacher's whole loss and the soft-target loss in TOG (default);
# "split" sends the dynamic teacher's TCKD / NCKD to TCG / NCG (its CE and the soft target stay in TOG).
_C.GPD.DEEPKD_BUFFERS = "task"

# Model EMA (timm's ModelEmaV2, deepkd_det/cls/ema.py): every GPD release command uses --model-ema with
# decay 0.99996. The EMA model is evaluated after every epoch beside the model; the best epoch is
# that of the better of the two top-1 values (the release's rule), and student_best.pth holds
# the weights that scored it.
_C.EMA = CN()
_C.EMA.ENABLED = False
_C.EMA.DECAY = 0.99996  # the release's --model-ema-decay

_C.LOG = CN()
_C.LOG.TENSORBOARD = True
_C.LOG.PROGRESS_BAR = True
_C.LOG.SAVE_EVERY = 40  # epochs between student-only ckpt_epoch_<N>.pth files (and the last epoch)
_C.LOG.EVAL_EVERY = 1  # epochs between evaluations (the last epoch is always evaluated)


def get_cfg() -> CN:
    """A fresh copy of the default configuration."""
    return _C.clone()


def load_cfg(path: Optional[str] = None, opts: Iterable[str] = (), validate: bool = True) -> CN:
    """Defaults, then ``path`` (with its ``_BASE_`` chain), then ``opts``; validated and frozen."""
    cfg = get_cfg()
    if path:
        _merge_file(cfg, path)
    merge_opts(cfg, opts)
    if validate:
        validate_cfg(cfg)
    cfg.freeze()
    return cfg


def experiment_name(cfg: CN) -> str:
    if cfg.EXPERIMENT.NAME:
        return cfg.EXPERIMENT.NAME
    kind = cfg.DISTILLER.TYPE
    if kind == "NONE":
        return f"{cfg.DISTILLER.STUDENT}_{'gpd' if cfg.GPD.ENABLED else 'vanilla'}"
    prefix = ""
    if cfg.DEEPKD.ENABLED:
        prefix = "dot_" if cfg.DEEPKD.OPTIMIZER == "dot" else "deepkd_"
    method = prefix + ("gpd_" if cfg.GPD.ENABLED else "") + kind.lower()
    return f"{method}_{cfg.DISTILLER.TEACHER}_{cfg.DISTILLER.STUDENT}"


def output_dir(cfg: CN) -> str:
    if cfg.OUTPUT_DIR:
        return cfg.OUTPUT_DIR
    return os.path.join(cfg.EXPERIMENT.OUTPUT_ROOT, cfg.DATASET.TYPE, experiment_name(cfg))


def dataset_root(cfg: CN) -> str:
    return cfg.DATASET.ROOT or _DEFAULT_ROOTS[cfg.DATASET.TYPE]


def validate_cfg(cfg: CN, num_classes: Optional[int] = None) -> None:
    """Raise :class:`ConfigError` listing every contradictory or out-of-range setting."""
    errors: List[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    ds, dist, solver, deep = cfg.DATASET, cfg.DISTILLER, cfg.SOLVER, cfg.DEEPKD
    need(ds.TYPE in DATASET_TYPES, f"DATASET.TYPE must be one of {DATASET_TYPES}, got {ds.TYPE!r}")
    need(ds.NUM_WORKERS >= 0, "DATASET.NUM_WORKERS must be >= 0")
    need(ds.TEST_BATCH_SIZE >= 1, "DATASET.TEST_BATCH_SIZE must be >= 1")
    need(0.0 < ds.DIGITS.VAL_FRACTION < 1.0, "DATASET.DIGITS.VAL_FRACTION must lie in (0, 1)")
    need(ds.DIGITS.SIZE >= 8, "DATASET.DIGITS.SIZE must be >= 8")
    need(ds.DIGITS.TRAIN_LIMIT >= 0, "DATASET.DIGITS.TRAIN_LIMIT must be >= 0")
    need(ds.DIGITS.TRAIN_PER_CLASS >= 0, "DATASET.DIGITS.TRAIN_PER_CLASS must be >= 0")
    need(cfg.DEVICE in ("auto", "cpu", "cuda"), f"DEVICE must be auto, cpu or cuda, got {cfg.DEVICE!r}")
    need(cfg.AMP.DTYPE in AMP_DTYPES, f"AMP.DTYPE must be one of {tuple(AMP_DTYPES)}, got {cfg.AMP.DTYPE!r}")

    need(dist.TYPE in DISTILLER_TYPES, f"DISTILLER.TYPE must be one of {DISTILLER_TYPES}, got {dist.TYPE!r}")
    need(bool(dist.STUDENT), "DISTILLER.STUDENT must name a model")
    _check_model_names(cfg, errors)
    if dist.TYPE != "NONE":
        need(bool(dist.TEACHER), f"DISTILLER.TYPE {dist.TYPE} needs a teacher: set DISTILLER.TEACHER")
    if deep.ENABLED and dist.TYPE == "NONE":
        errors.append(
            "DEEPKD.ENABLED needs a distillation method (DISTILLER.TYPE KD, DKD, MLKD, CRLD or DIFFKD): with NONE "
            "there is "
            "no target/non-target gradient to decouple"
        )

    need(solver.EPOCHS >= 1, "SOLVER.EPOCHS must be >= 1")
    need(solver.BATCH_SIZE >= 1, "SOLVER.BATCH_SIZE must be >= 1")
    need(solver.LR > 0, f"SOLVER.LR must be positive, got {solver.LR}")
    need(solver.WEIGHT_DECAY >= 0, "SOLVER.WEIGHT_DECAY must be >= 0")
    need(0.0 <= solver.MOMENTUM < 1.0, f"SOLVER.MOMENTUM must lie in [0, 1), got {solver.MOMENTUM}")
    need(solver.OPTIMIZER in ("sgd", "adamw"), f"SOLVER.OPTIMIZER must be 'sgd' or 'adamw', got {solver.OPTIMIZER!r}")
    if solver.OPTIMIZER == "adamw" and deep.ENABLED:
        errors.append("SOLVER.OPTIMIZER adamw with DEEPKD.ENABLED: DeepKD's decoupled momentum is an SGD optimizer")
    need(solver.LR_SCHEDULER in ("step", "cosine"),
         f"SOLVER.LR_SCHEDULER must be 'step' or 'cosine', got {solver.LR_SCHEDULER!r}")
    stages = list(solver.LR_DECAY_STAGES)
    need(stages == sorted(stages) and len(set(stages)) == len(stages),
         f"SOLVER.LR_DECAY_STAGES must be strictly increasing, got {stages}")
    need(0.0 < solver.LR_DECAY_RATE <= 1.0, "SOLVER.LR_DECAY_RATE must lie in (0, 1]")
    need(0.0 <= solver.WARMUP_EPOCHS < solver.EPOCHS, "SOLVER.WARMUP_EPOCHS must lie in [0, EPOCHS)")
    need(0.0 <= solver.MIN_LR <= solver.LR, "SOLVER.MIN_LR must lie in [0, LR]")

    need(cfg.KD.TEMPERATURE > 0, "KD.TEMPERATURE must be positive")
    need(cfg.DKD.T > 0, "DKD.T must be positive")
    need(cfg.KD.WARMUP >= 0 and cfg.DKD.WARMUP >= 0, "KD.WARMUP and DKD.WARMUP must be >= 0")
    for key in ("CE_WEIGHT", "KD_WEIGHT"):
        need(cfg.KD[key] >= 0, f"KD.{key} must be >= 0")
    for key in ("CE_WEIGHT", "ALPHA", "BETA"):
        need(cfg.DKD[key] >= 0, f"DKD.{key} must be >= 0")

    _check_two_view_methods(cfg, need)
    d = cfg.DIFFKD
    for key in ("CE_WEIGHT", "FEATURE_WEIGHT", "LOGIT_WEIGHT", "DIFF_WEIGHT", "AE_WEIGHT", "WARMUP"):
        need(d[key] >= 0, f"DIFFKD.{key} must be >= 0, got {d[key]}")
    need(d.AE_CHANNELS >= 0, f"DIFFKD.AE_CHANNELS must be 0 (no autoencoder) or positive, got {d.AE_CHANNELS}")
    need(1 <= d.INFERENCE_STEPS <= 500, f"DIFFKD.INFERENCE_STEPS must lie in 1..500, got {d.INFERENCE_STEPS}")
    if dist.TYPE == "DIFFKD":
        need(d.FEATURE_WEIGHT > 0 or d.LOGIT_WEIGHT > 0,
             "DIFFKD.FEATURE_WEIGHT and DIFFKD.LOGIT_WEIGHT are both 0: DiffKD would distil nothing")
    _check_gpd(cfg, need)
    r = cfg.REVIEWKD
    for key in ("CE_WEIGHT", "WEIGHT", "WARMUP"):
        need(r[key] >= 0, f"REVIEWKD.{key} must be >= 0, got {r[key]}")
    need(r.MID_CHANNELS >= 0, f"REVIEWKD.MID_CHANNELS must be 0 (automatic) or positive, got {r.MID_CHANNELS}")
    if dist.TYPE == "REVIEWKD":
        from .models import MODEL_REGISTRY

        for key in ("STUDENT", "TEACHER"):
            name = dist[key]
            if name in MODEL_REGISTRY and not _has_stages(name):
                errors.append(f"DISTILLER.{key} {name!r} gives no stage features for ReviewKD (supported: the "
                              "CIFAR and ImageNet ResNets, imagenet_mobilenet_v1, the vision transformers)")
    need(0.0 <= cfg.EMA.DECAY < 1.0, f"EMA.DECAY must lie in [0, 1), got {cfg.EMA.DECAY}")

    num = num_classes or NUM_CLASSES.get(ds.TYPE)
    errors.extend(validate_deepkd_settings(deep, solver.MOMENTUM, num - 1 if num else None))
    need(cfg.LOG.SAVE_EVERY >= 1 and cfg.LOG.EVAL_EVERY >= 1, "LOG.SAVE_EVERY and LOG.EVAL_EVERY must be >= 1")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _check_two_view_methods(cfg: CN, need) -> None:
    from deepkd_det.core.views import CONFIDENCE_MASK_MODES

    need(cfg.DATASET.STRONG_AUG in STRONG_AUGS,
         f"DATASET.STRONG_AUG must be one of {STRONG_AUGS}, got {cfg.DATASET.STRONG_AUG!r}")
    m, c = cfg.MLKD, cfg.CRLD
    temps = list(m.TEMPERATURES)
    need(bool(temps) and all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temps),
         f"MLKD.TEMPERATURES must be a non-empty list of positive numbers, got {temps}")
    need(c.T > 0, "CRLD.T must be positive")
    for name, node, keys in (("MLKD", m, ("CE_WEIGHT", "KD_WEIGHT", "ALPHA", "BETA", "WARMUP")),
                             ("CRLD", c, ("CE_WEIGHT", "WITHIN_WEIGHT", "CROSS_WEIGHT", "ALPHA", "BETA", "WARMUP"))):
        for key in keys:
            need(node[key] >= 0, f"{name}.{key} must be >= 0, got {node[key]}")
        need(node.SPLIT in ("kd", "dkd"), f"{name}.SPLIT must be 'kd' or 'dkd', got {node.SPLIT!r}")
        need(node.CONFIDENCE_MASK in CONFIDENCE_MASK_MODES,
             f"{name}.CONFIDENCE_MASK must be one of {CONFIDENCE_MASK_MODES}, got {node.CONFIDENCE_MASK!r}")
    for key in ("TAU_WEAK", "TAU_STRONG"):
        need(0.0 <= c[key] <= 1.0, f"CRLD.{key} is a probability threshold and must lie in [0, 1], got {c[key]}")


GPD_DISTILLERS = ("NONE", "DKD", "REVIEWKD")
GPD_DEEPKD_BUFFERS = ("task", "split")
# Students whose forward shuffles / concatenates channels: the leading-slice layout of core.gpd
# cannot hold (the trainer also compares both widths at start-up, for any model).
GPD_UNSLICEABLE = ("ShuffleV1", "ShuffleV2")


def _check_gpd(cfg: CN, need) -> None:
    g = cfg.GPD
    if not g.ENABLED:
        return
    need(cfg.DISTILLER.TYPE in GPD_DISTILLERS,
         f"GPD.ENABLED supports DISTILLER.TYPE NONE (from scratch), DKD or REVIEWKD, got {cfg.DISTILLER.TYPE!r}")
    need(cfg.DISTILLER.STUDENT not in GPD_UNSLICEABLE,
         f"GPD.ENABLED: DISTILLER.STUDENT {cfg.DISTILLER.STUDENT} shuffles channels and cannot be width-sliced")
    need(isinstance(g.RATIO, int) and not isinstance(g.RATIO, bool) and g.RATIO >= 2,
         f"GPD.RATIO must be an int >= 2 (the dynamic teacher is RATIO times wider), got {g.RATIO!r}")
    need(g.BRANCHES == 6, f"GPD.BRANCHES must be 6 (the released CBR branch set; core.gpd.CBR_BRANCHES), got {g.BRANCHES}")
    need(g.CBR_INIT in ("multi", "single"), f"GPD.CBR_INIT must be 'multi' or 'single', got {g.CBR_INIT!r}")
    need(g.KD_RATIO >= 0, f"GPD.KD_RATIO must be >= 0, got {g.KD_RATIO}")
    need(0.0 <= g.SMOOTHING <= 1.0, f"GPD.SMOOTHING must lie in [0, 1], got {g.SMOOTHING}")
    need(g.CLIP_GRAD_NORM >= 0, f"GPD.CLIP_GRAD_NORM must be >= 0 (0: no clip), got {g.CLIP_GRAD_NORM}")
    if cfg.FINETUNE.STUDENT_WEIGHTS and g.CBR:
        need(g.CBR_INIT == "single",
             "FINETUNE.STUDENT_WEIGHTS with GPD.CBR needs GPD.CBR_INIT single (the release's fine-tuning init: the "
             "extra branches start at scale 0, so the pretrained student keeps its function)")
    need(g.DEEPKD_BUFFERS in GPD_DEEPKD_BUFFERS,
         f"GPD.DEEPKD_BUFFERS must be one of {GPD_DEEPKD_BUFFERS}, got {g.DEEPKD_BUFFERS!r}")


def _has_stages(name: str) -> bool:
    """Whether the model class ``name`` builds has ``forward_stages`` (ReviewKD's levels); no model is built."""
    import inspect

    from .models import MODEL_REGISTRY

    builder = MODEL_REGISTRY[name]
    cls = inspect.signature(builder).return_annotation
    if isinstance(cls, str):  # postponed annotations: resolve in the builder's module
        cls = builder.__globals__.get(cls)
    return cls is not None and hasattr(cls, "forward_stages")


def _check_model_names(cfg: CN, errors: List[str]) -> None:
    from .models import list_models

    known = list_models()
    for key in ("STUDENT", "TEACHER"):
        name = cfg.DISTILLER[key]
        if name and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; available: {', '.join(known)}"
            errors.append(f"DISTILLER.{key}: unknown model {name!r}{hint}")


def build_topk_schedule(cfg: CN, num_classes: int):
    """The dynamic top-k schedule of DeepKD, or None when DeepKD or the mask is off."""
    return core_topk_schedule(cfg.DEEPKD, num_classes - 1)
