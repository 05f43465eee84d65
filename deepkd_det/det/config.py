"""Config keys of the DeepKD detection extension, their validation, and a tiny test config.

``add_deepkd_config(cfg)`` adds the keys to a detectron2 ``CfgNode`` (every key is documented
at its definition below); ``validate_deepkd_config(cfg)`` rejects contradictory or out-of-range
settings with a ValueError that names the key; ``get_tiny_cfg()`` returns a ready CPU config
for tests and the embedded demo.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any, Dict, Optional

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from deepkd_det.core.amp import AMP_DTYPES
from deepkd_det.core.io import read_yaml_mapping
from deepkd_det.core.settings import build_topk_schedule as core_topk_schedule
from deepkd_det.core.settings import decoupled, deepkd_node, validate_deepkd_settings
from deepkd_det.core.topk import TopKSchedule

__all__ = [
    "KD_TYPES",
    "add_deepkd_config",
    "get_deepkd_cfg",
    "model_zoo_config_file",
    "resolve_teacher_cfg",
    "merge_config_file",
    "student_only_cfg",
    "student_architecture",
    "student_num_classes",
    "build_topk_schedule",
    "check_input_files",
    "check_weights_file",
    "lr_batch_warning",
    "validate_deepkd_config",
    "validate_detection_deepkd",
]

KD_TYPES = ("NONE", "KD", "DKD")
DENSE_KD_TYPES = ("NONE", "KD", "DKD")
# The names the distillation wrapper (deepkd_det/det/distill/wrapper.py) is registered under.
WRAPPER_ARCHITECTURES = ("DeepKDRCNN", "DistillDetector")
# Dense (one-stage) detectors and the key of their class count.
DENSE_ARCHITECTURES = {"RetinaNet": "MODEL.RETINANET.NUM_CLASSES", "FCOS": "MODEL.FCOS.NUM_CLASSES"}
COUPLINGS = ("row", "batch")


def _add_mobilenetv2_config(cfg: CN) -> None:
    # MobileNetV2 backbone (torchvision's architecture) for the R-50 -> MV2 pair.
    cfg.MODEL.MOBILENETV2 = CN()
    # Stage outputs: m2/m3/m4/m5 are the ends of the stride-4/8/16/32 stages
    # (24/32/96/320 channels, torchvision feature indices 3/6/13/17).
    cfg.MODEL.MOBILENETV2.OUT_FEATURES = ["m2", "m3", "m4", "m5"]
    # "FrozenBN" (ImageNet statistics, the usual detection setting), "BN", "SyncBN", "GN", ...
    cfg.MODEL.MOBILENETV2.NORM = "FrozenBN"
    # Width multiplier of torchvision's MobileNetV2 (1.0 for the ImageNet weights).
    cfg.MODEL.MOBILENETV2.WIDTH_MULT = 1.0


def _fresh_copy(value):
    """Deep copy that also rebuilds tuples, so that no object is shared with the original
    (shared objects would appear as YAML anchors/aliases in ``cfg.dump()``)."""
    if isinstance(value, CN):
        return CN({k: _fresh_copy(v) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple([_fresh_copy(v) for v in value])
    if isinstance(value, list):
        return [_fresh_copy(v) for v in value]
    return copy.deepcopy(value)


def add_deepkd_config(cfg: CN) -> CN:
    """Add the TEACHER, KD and DEEPKD keys (and MODEL.MOBILENETV2) to ``cfg`` in place."""
    if "MOBILENETV2" not in cfg.MODEL:
        _add_mobilenetv2_config(cfg)

    # ---------------------------------------------------------------- teacher
    cfg.TEACHER = CN()
    # A full copy of detectron2's MODEL defaults; the entries set to another value override the
    # teacher's base (TEACHER.CONFIG_FILE's MODEL, else the student's MODEL): its backbone / FPN /
    # RPN / ROI heads, PIXEL_MEAN / PIXEL_STD (its own normalisation) and WEIGHTS. The teacher runs on the device
    # of the student (MODEL.DEVICE); TEACHER.MODEL.DEVICE is ignored.
    # WEIGHTS: a detectron2 checkpoint of the teacher (model-zoo .pkl, or .pth with or without the
    # "teacher." prefix). Empty: the teacher keys of MODEL.WEIGHTS (a combined release file).
    # Missing or unexpected teacher keys stop the build with the key names.
    cfg.TEACHER.MODEL = _fresh_copy(cfg.MODEL)
    # Channel order the teacher was trained with ("BGR" for detectron2's model zoo). Images are
    # flipped to it when it differs from INPUT.FORMAT.
    cfg.TEACHER.INPUT_FORMAT = "BGR"
    # "" or a detectron2 yaml (a path, or "model_zoo:COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml")
    # whose MODEL part is the base of the teacher; "": the student's MODEL is. A relative path in a
    # yaml is relative to that yaml (merge_config_file, which train_net.py uses). TEACHER.MODEL
    # entries that differ from detectron2's defaults override the base (resolve_teacher_cfg). Its
    # MODEL.WEIGHTS is ignored (see TEACHER.MODEL.WEIGHTS).
    cfg.TEACHER.CONFIG_FILE = ""
    # Allow a teacher without weights (random init). Only for tests and smoke runs: a warning
    # is logged. Off by default: a teacher with missing weights stops the build.
    cfg.TEACHER.ALLOW_RANDOM_INIT = False
    # The teacher's forward at its cheapest exact form (deepkd_det/det/modeling/teacher.py):
    # FOLD_NORM folds each FrozenBatchNorm2d into the detectron2 Conv2d before it (same logits to
    # float rounding; the teacher's state dict is unchanged); CHANNELS_LAST runs the folded
    # backbone in channels-last memory order; AMP_DTYPE "" (float32), "bf16" or "fp16" runs the
    # teacher's backbone and box head under autocast (meant for GPUs); its logits and features are
    # returned in float32, so every KD loss is computed in float32.
    cfg.TEACHER.FOLD_NORM = True
    cfg.TEACHER.CHANNELS_LAST = False
    cfg.TEACHER.AMP_DTYPE = ""

    # ---------------------------------------------------------------- distillation loss
    cfg.KD = CN()
    # "NONE" (plain Faster R-CNN, no teacher built), "KD" (classical KD split into TCKD and the
    # coupled NCKD), "DKD" (decoupled KD: alpha * TCKD + beta * NCKD), on the R-CNN head logits.
    cfg.KD.TYPE = "DKD"
    # DKD weight of TCKD (DKD paper COCO setting: 1.0).
    cfg.KD.ALPHA = 1.0
    # DKD weight of NCKD (DKD paper COCO setting: 0.25).
    cfg.KD.BETA = 0.25
    # Softmax temperature T of both terms (COCO: 1.0). The terms are multiplied by T^2.
    cfg.KD.TEMPERATURE = 1.0
    # Weight of both KD components when TYPE is "KD".
    cfg.KD.KD_WEIGHT = 1.0
    # Linear warm-up of the distillation terms over this many iterations (0 = none).
    cfg.KD.WARMUP_ITERS = 0
    # Logit standardisation ("logit standardization KD") of both logits before the losses.
    cfg.KD.LOGIT_STAND = False
    # KD only: "row" (paper, exact per-row (1 - p_t[y]_i) * NCKD_i) or "batch" (the released
    # reference code: mean_i(1 - p_t[y]_i) * mean_i NCKD_i).
    cfg.KD.COUPLING = "row"
    # The student detector inside the distillation wrapper (MODEL.META_ARCHITECTURE "DeepKDRCNN"
    # or its alias "DistillDetector"): any detectron2 meta-architecture built from MODEL
    # ("GeneralizedRCNN": Faster / Mask / Cascade R-CNN by ROI_HEADS; "RetinaNet"). Its state-dict
    # keys stay the plain detector's; the teacher's base architecture is this one unless
    # TEACHER.CONFIG_FILE names another (deepkd_det/det/distill/wrapper.py).
    cfg.KD.STUDENT_ARCHITECTURE = "GeneralizedRCNN"
    # Logit distillation on a dense sigmoid head (RetinaNet), per anchor and class
    # (deepkd_det/core/dense_kd.py; docs/maths.md "sigmoid heads"): "NONE", "KD" (binary KL at
    # temperature T summed over classes), "DKD" (its target / non-target split, ALPHA / BETA
    # below; the form DeepKD uses, with DEEPKD.ENABLED: our extension, no published form).
    cfg.KD.DENSE = CN()
    cfg.KD.DENSE.TYPE = "NONE"
    cfg.KD.DENSE.LOSS_WEIGHT = 1.0
    cfg.KD.DENSE.TEMPERATURE = 1.0
    cfg.KD.DENSE.ALPHA = 1.0
    cfg.KD.DENSE.BETA = 1.0
    # Classes of negative (background) anchors: "nontarget" (every class of a negative anchor is a
    # non-target class) or "ignore" (negatives left out); anchors RetinaNet ignores are always out.
    cfg.KD.DENSE.NEGATIVES = "nontarget"
    # ReviewKD feature distillation (Chen et al., CVPR 2021) between the student's and the
    # teacher's FPN outputs: a trained review head (attention-based fusion) maps the student's
    # levels to the teacher's, compared by the hierarchical context loss (HCL), returned as
    # "loss_reviewkd". Works alone (KD.TYPE "NONE": the teacher is built for its features only)
    # and with KD/DKD/DeepKD on the logits (DeepKD puts it in the task component, TOG).
    cfg.KD.REVIEWKD = CN()
    cfg.KD.REVIEWKD.ENABLED = False
    # Weight of the HCL loss (release: 1.0 R101->R50, 1.2 R101->R18, 2.0 R50->MV2).
    cfg.KD.REVIEWKD.LOSS_WEIGHT = 1.0
    # FPN outputs compared, finest first (names and strides must agree between the two FPNs).
    cfg.KD.REVIEWKD.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Channels inside the review head (its fusion maps).
    cfg.KD.REVIEWKD.MID_CHANNELS = 256
    # HCL pyramid sizes (adaptive average pooling to l x l, weights 1/2, 1/4, ...).
    cfg.KD.REVIEWKD.HCL_LEVELS = [4, 2, 1]
    # DiffKD (Huang et al., NeurIPS 2023): each listed FPN level of the student is projected to
    # the teacher's channels, noise-matched and denoised by a small diffusion model trained on
    # the teacher's map of that level (deepkd_det/core/diffkd.py), then compared with it (MSE).
    # One DiffKD module per level (training-only, state-dict keys ``diffkd.<level>.*``). Losses:
    # "loss_diffkd_kd" (LOSS_WEIGHT * sum over levels of the MSE), "loss_diffkd_diff"
    # (DIFF_WEIGHT * sum of the diffusion losses), "loss_diffkd_ae" (with AE_CHANNELS) and
    # "loss_regkd" (REG_WEIGHT * box-regression KD, deepkd_det/core/boxkd.py). Works alone
    # (KD.TYPE "NONE") and with KD/DKD/DeepKD on the logits (DeepKD puts all of them in TOG).
    cfg.KD.DIFFKD = CN()
    cfg.KD.DIFFKD.ENABLED = False
    # FPN outputs distilled (names and strides must agree between the two FPNs).
    cfg.KD.DIFFKD.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Weight of the KD loss between the denoised student and the teacher (paper, Faster R-CNN: 5).
    cfg.KD.DIFFKD.LOSS_WEIGHT = 5.0
    # Weight of the diffusion (noise-prediction) loss (paper: 1).
    cfg.KD.DIFFKD.DIFF_WEIGHT = 1.0
    # Weight of the autoencoder reconstruction loss (paper: 1; used only with AE_CHANNELS).
    cfg.KD.DIFFKD.AE_WEIGHT = 1.0
    # Latent channels of the linear autoencoder on the teacher's maps; 0 = no autoencoder
    # (paper: none on the 256-channel FPN).
    cfg.KD.DIFFKD.AE_CHANNELS = 0
    # DDIM steps of the student's denoising (paper and release: 5).
    cfg.KD.DIFFKD.INFERENCE_STEPS = 5
    # Weight of the box-regression KD: mean over foreground sampled proposals of the squared L2
    # distance between the student's and the teacher's deltas of the ground-truth class, on the
    # same boxes (paper, Faster R-CNN: a regression KD loss with weight 1; its form is ours).
    # 0 turns it off.
    cfg.KD.DIFFKD.REG_WEIGHT = 1.0
    # The attention-weighted MSE of DiffKD's detection variant (the paper's dagger rows) instead
    # of the plain MSE for the feature KD loss.
    cfg.KD.DIFFKD.ATTENTION = False
    # Dense-head outputs distilled by DiffKD as well (RetinaNet): [] or any of "cls", "reg".
    cfg.KD.DIFFKD.DENSE_OUTPUTS = []
    # Weight of the KD loss of the dense-output DiffKD modules (unpublished; the FPN's 5 is no
    # guide for outputs of another scale).
    cfg.KD.DIFFKD.DENSE_WEIGHT = 1.0

    # ---------------------------------------------------------------- DeepKD
    # The DeepKD node shared with the classifier (deepkd_det/core/settings.py documents every
    # key): DEEPKD.ENABLED turns on the top-k mask on NCKD (DEEPKD.TOPK, over the C - 1 =
    # NUM_CLASSES non-target classes, background included) and, with DEEPKD.DECOUPLE, the
    # decoupled update around SOLVER.MOMENTUM. Needs KD.TYPE "KD" or "DKD".
    cfg.DEEPKD = deepkd_node(CN)
    # Mixed precision (detectron2's SOLVER.AMP.ENABLED) in "fp16" (one gradient scaler; with
    # DeepKD over all components, deepkd_det/core/amp.py) or "bf16" (autocast only).
    cfg.SOLVER.AMP.DTYPE = "fp16"
    return cfg


def get_deepkd_cfg() -> CN:
    """detectron2's default config with the DeepKD keys added."""
    return add_deepkd_config(get_cfg())


# ---------------------------------------------------------------- teacher config


def model_zoo_config_file(name: str) -> str:
    """Path of detectron2's model-zoo config ``name`` (e.g. ``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``),
    found next to the installed detectron2 package (``detectron2/model_zoo/configs/``, or
    ``configs/`` of a source checkout) without importing ``detectron2.model_zoo``, which needs
    ``pkg_resources`` on detectron2 after v0.6 (gone from setuptools >= 81)."""
    spec = importlib.util.find_spec("detectron2")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    tried = []
    for root in roots:
        for candidate in (os.path.join(root, "model_zoo", "configs", name), os.path.join(root, "..", "configs", name)):
            candidate = os.path.normpath(candidate)
            tried.append(candidate)
            if os.path.isfile(candidate):
                return candidate
    raise ValueError(f"{name!r} is not a detectron2 model-zoo config (looked for {tried})")


def _config_file_path(name: str) -> str:
    if name.startswith("model_zoo:"):
        try:
            return model_zoo_config_file(name[len("model_zoo:") :])
        except ValueError as e:
            raise ValueError(f"TEACHER.CONFIG_FILE: {e}") from None
    return name


def _yaml_chain(path: str):
    """``(file, mapping)`` for ``path`` and each _BASE_ below it. A file that is not valid YAML, or
    whose top level is not a mapping of keys, is a ValueError naming the file (and the line)."""
    while path:
        data = read_yaml_mapping(path, python_tags_ok=True)
        if data is None:
            return  # a python tag: detectron2's own loader (unsafe_load) decides
        yield path, data
        base = data.get("_BASE_")
        if not base:
            return
        base = os.path.expanduser(base)
        # detectron2's rule for _BASE_: relative to the file that names it.
        path = base if base.startswith(("/", "https://", "http://")) else os.path.join(os.path.dirname(path), base)


def _setting_file(path: str, section: str, key: str) -> Optional[str]:
    """The yaml of ``path``'s _BASE_ chain whose ``section.key`` the merged config holds (the
    first one from ``path`` down that states it; later files override their bases), else None."""
    for file, data in _yaml_chain(path):
        if isinstance(data.get(section), dict) and data[section].get(key):
            return file
    return None


def merge_config_file(cfg: CN, path: str) -> CN:
    """``cfg.merge_from_file(path)``, with a relative TEACHER.CONFIG_FILE taken relative to the
    yaml that states it (as detectron2 takes _BASE_), so a config finds its teacher's config from
    any working directory. A TEACHER.CONFIG_FILE given on the command line stays as typed.
    A file of the chain that is not YAML, or not a mapping, is a ValueError naming it."""
    for _ in _yaml_chain(path):
        pass
    cfg.merge_from_file(path)
    name = cfg.TEACHER.CONFIG_FILE
    if name and not name.startswith("model_zoo:") and not os.path.isabs(name):
        origin = _setting_file(path, "TEACHER", "CONFIG_FILE")
        if origin is not None:
            cfg.TEACHER.CONFIG_FILE = os.path.normpath(os.path.join(os.path.dirname(origin), name))
    return cfg


def _diff(node: CN, base: CN, prefix: str = "") -> Dict[str, Any]:
    """Flattened ``{dotted.key: value}`` of the entries of ``node`` that differ from ``base``."""
    out: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, CN) and isinstance(base.get(key), CN):
            out.update(_diff(value, base[key], f"{prefix}{key}."))
        elif key not in base or base[key] != value:
            out[prefix + key] = value
    return out


def resolve_teacher_cfg(cfg: CN) -> CN:
    """A full detectron2 config whose MODEL is the teacher's.

    The teacher's MODEL starts from TEACHER.CONFIG_FILE's MODEL (on detectron2's defaults) when
    that is set, else from the student's MODEL (the wrapper's meta-architecture becomes
    KD.STUDENT_ARCHITECTURE: the teacher is a plain detector); then every TEACHER.MODEL entry that
    differs from detectron2's default overrides it. So a teacher block states only what differs
    from the student; a teacher value equal to detectron2's default where the student differs
    (normalisation, RES2_OUT_CHANNELS, ...) is stated by its config file, which is the config the
    teacher's weights were trained with (the COCO pairs name the model-zoo one). The student's
    MODEL.DEVICE is used for the teacher; its weights are TEACHER.MODEL.WEIGHTS only.
    """
    teacher_cfg = get_deepkd_cfg()
    defaults = teacher_cfg.MODEL.clone()
    if cfg.TEACHER.CONFIG_FILE:
        path = _config_file_path(cfg.TEACHER.CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"TEACHER.CONFIG_FILE {cfg.TEACHER.CONFIG_FILE!r} does not exist")
        teacher_cfg.set_new_allowed(True)
        try:
            for _ in _yaml_chain(path):
                pass
        except ValueError as exc:
            raise ValueError(f"TEACHER.CONFIG_FILE: {exc}") from None
        teacher_cfg.merge_from_file(path)
    else:
        teacher_cfg.MODEL = _fresh_copy(cfg.MODEL)
        if teacher_cfg.MODEL.META_ARCHITECTURE in WRAPPER_ARCHITECTURES:
            teacher_cfg.MODEL.META_ARCHITECTURE = cfg.KD.STUDENT_ARCHITECTURE
    overrides = _diff(cfg.TEACHER.MODEL, defaults)
    teacher_cfg.defrost()
    for dotted, value in overrides.items():
        node = teacher_cfg.MODEL
        *parents, leaf = dotted.split(".")
        for p in parents:
            if p not in node:  # keys another extension added to MODEL before add_deepkd_config
                node[p] = CN()
            node = node[p]
        node[leaf] = _fresh_copy(value)
    # A model-zoo yaml's WEIGHTS is the ImageNet init of its training, not the trained teacher:
    # only TEACHER.MODEL.WEIGHTS (or the teacher.* keys of MODEL.WEIGHTS) count.
    teacher_cfg.MODEL.WEIGHTS = cfg.TEACHER.MODEL.WEIGHTS
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.INPUT.FORMAT = cfg.TEACHER.INPUT_FORMAT
    teacher_cfg.freeze()
    return teacher_cfg


def build_topk_schedule(cfg: CN) -> Optional[TopKSchedule]:
    """The DTM schedule of cfg.DEEPKD over the C - 1 = NUM_CLASSES non-target classes (None: no mask)."""
    return core_topk_schedule(cfg.DEEPKD, num_nontarget=cfg.MODEL.ROI_HEADS.NUM_CLASSES)




def student_only_cfg(cfg: CN) -> CN:
    """The config of the student alone, for evaluation and export: MODEL.META_ARCHITECTURE the
    student's own (KD.STUDENT_ARCHITECTURE in place of the distillation wrapper), every
    distillation part off (each part's ``disable``, deepkd_det/det/distill/parts/) and DEEPKD off,
    so no teacher, teacher file or training-only module is built, whatever the config says. The
    student is the same model with the same state-dict keys: the wrapper registers the student's
    children at its top level."""
    from deepkd_det.det.distill.parts import DISTILL_PART_REGISTRY, part_order

    cfg = cfg.clone()
    cfg.defrost()
    if cfg.MODEL.META_ARCHITECTURE in WRAPPER_ARCHITECTURES:
        cfg.MODEL.META_ARCHITECTURE = cfg.KD.STUDENT_ARCHITECTURE
    for name in part_order():
        DISTILL_PART_REGISTRY.get(name).disable(cfg)
    cfg.DEEPKD.ENABLED = False
    cfg.freeze()
    return cfg


# ---------------------------------------------------------------- validation


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def validate_deepkd_config(cfg: CN) -> None:
    """Raise ValueError naming the key for contradictory or out-of-range DeepKD settings."""
    for node in ("TEACHER", "KD"):
        if node not in cfg:
            raise ValueError(f"cfg has no {node} node: call deepkd_det.det.config.add_deepkd_config(cfg) first")
    kd, dk = cfg.KD, cfg.DEEPKD
    _check_choice("KD.TYPE", kd.TYPE, KD_TYPES)
    _check_choice("KD.DENSE.TYPE", kd.DENSE.TYPE, DENSE_KD_TYPES)
    distill = kd.TYPE != "NONE" or kd.DENSE.TYPE != "NONE"
    reviewkd = _validate_reviewkd(cfg)
    diffkd = _validate_diffkd(cfg)
    if kd.STUDENT_ARCHITECTURE in WRAPPER_ARCHITECTURES:
        raise ValueError(f"KD.STUDENT_ARCHITECTURE {kd.STUDENT_ARCHITECTURE!r} is the distillation wrapper itself; "
                         "name a detector (GeneralizedRCNN, RetinaNet, ...)")
    if dk.ENABLED and not distill:
        raise ValueError(
            "DEEPKD.ENABLED needs a distillation loss, but KD.TYPE and KD.DENSE.TYPE are 'NONE' "
            "(set KD.TYPE to 'KD' or 'DKD' for an R-CNN student, KD.DENSE.TYPE for a RetinaNet one, or disable DEEPKD)"
            + ("; KD.REVIEWKD alone is a task-side (TOG) loss and needs no DeepKD" if reviewkd else "")
            + ("; KD.DIFFKD alone is a task-side (TOG) loss and needs no DeepKD" if diffkd else "")
        )
    for key, on in (("KD.DIFFKD.ENABLED", diffkd), ("KD.REVIEWKD.ENABLED", reviewkd), (f"KD.TYPE {kd.TYPE!r}", kd.TYPE != "NONE"),
                    (f"KD.DENSE.TYPE {kd.DENSE.TYPE!r}", kd.DENSE.TYPE != "NONE")):
        if on and cfg.MODEL.META_ARCHITECTURE not in WRAPPER_ARCHITECTURES:
            raise ValueError(
                f"{key} needs MODEL.META_ARCHITECTURE 'DistillDetector' (or 'DeepKDRCNN'), "
                f"got {cfg.MODEL.META_ARCHITECTURE!r} (no distillation would happen)"
            )
    d = kd.DENSE
    if not d.TEMPERATURE > 0:
        raise ValueError(f"KD.DENSE.TEMPERATURE must be > 0, got {d.TEMPERATURE}")
    for key in ("ALPHA", "BETA", "LOSS_WEIGHT"):
        if not d[key] >= 0:
            raise ValueError(f"KD.DENSE.{key} must be >= 0, got {d[key]}")
    _check_choice("KD.DENSE.NEGATIVES", d.NEGATIVES, ("nontarget", "ignore"))

    # loss
    if not kd.TEMPERATURE > 0:
        raise ValueError(f"KD.TEMPERATURE must be > 0, got {kd.TEMPERATURE}")
    for key in ("ALPHA", "BETA", "KD_WEIGHT"):
        if not kd[key] >= 0:
            raise ValueError(f"KD.{key} must be >= 0, got {kd[key]}")
    if kd.WARMUP_ITERS < 0:
        raise ValueError(f"KD.WARMUP_ITERS must be >= 0, got {kd.WARMUP_ITERS}")
    _check_choice("KD.COUPLING", kd.COUPLING, COUPLINGS)

    _validate_solver_steps(cfg)

    # DeepKD node (shared with the classifier)
    num_classes = student_num_classes(cfg)
    if num_classes < 0:
        raise ValueError(f"{_num_classes_key(cfg)} must be >= 1 (or 0: from the dataset json), got {num_classes}")
    # 0: taken from the dataset json at start-up (deepkd_det/det/data/register.py), checked then.
    validate_detection_deepkd(dk, cfg.SOLVER.MOMENTUM, num_classes)

    _check_choice("SOLVER.AMP.DTYPE", cfg.SOLVER.AMP.DTYPE, AMP_DTYPES)
    _check_choice("TEACHER.AMP_DTYPE", cfg.TEACHER.AMP_DTYPE, ("",) + tuple(AMP_DTYPES))

    # teacher
    _check_choice("TEACHER.INPUT_FORMAT", cfg.TEACHER.INPUT_FORMAT, ("BGR", "RGB"))
    if cfg.TEACHER.CONFIG_FILE and not os.path.isfile(_config_file_path(cfg.TEACHER.CONFIG_FILE)):
        raise ValueError(f"TEACHER.CONFIG_FILE {cfg.TEACHER.CONFIG_FILE!r} does not exist")
    # The teacher's config is resolved once, when the teacher is built; the parts then check what
    # they pair (class counts, heads, levels) against the built models
    # (deepkd_det/det/distill/heads.py), each with one line naming both sides.


def student_architecture(cfg: CN) -> str:
    """The detector being trained: KD.STUDENT_ARCHITECTURE inside the wrapper, else MODEL's own."""
    arch = cfg.MODEL.META_ARCHITECTURE
    return cfg.KD.STUDENT_ARCHITECTURE if arch in WRAPPER_ARCHITECTURES and "KD" in cfg else arch


def _num_classes_key(cfg: CN) -> str:
    return DENSE_ARCHITECTURES.get(student_architecture(cfg), "MODEL.ROI_HEADS.NUM_CLASSES")


def student_num_classes(cfg: CN) -> int:
    """The detector's class count in ``cfg`` (MODEL.ROI_HEADS.NUM_CLASSES, or the dense head's key
    for RetinaNet-like students)."""
    node = cfg
    for part in _num_classes_key(cfg).split("."):
        node = node[part]
    return int(node)


def validate_detection_deepkd(node, momentum: float, num_classes: int, prefix: str = "DEEPKD",
                              momentum_key: str = "SOLVER.MOMENTUM") -> None:
    """The DEEPKD node of a detector (the yacs config's, or a LazyConfig's ``deepkd``): the shared
    checks (core.settings) over its ``num_classes`` non-target classes (C - 1 with background;
    0: not known yet) and detection's own, as one ValueError naming the keys."""
    errors = validate_deepkd_settings(node, momentum, num_classes or None, prefix, momentum_key)
    if errors:
        raise ValueError("; ".join(errors))
    if node.GSNR.ENABLED and not decoupled(node):
        raise ValueError(f"{prefix}.GSNR.ENABLED needs the decoupled update ({prefix}.ENABLED and {prefix}.DECOUPLE) "
                         "in detection: the per-component gradients are measured inside the decoupled step")


def _validate_reviewkd(cfg: CN) -> bool:
    """Check KD.REVIEWKD; return whether it is enabled. Feature names and strides are checked
    against the built FPNs when the model is built."""
    r = cfg.KD.REVIEWKD
    if not r.LOSS_WEIGHT >= 0:
        raise ValueError(f"KD.REVIEWKD.LOSS_WEIGHT must be >= 0, got {r.LOSS_WEIGHT}")
    if int(r.MID_CHANNELS) != r.MID_CHANNELS or r.MID_CHANNELS < 1:
        raise ValueError(f"KD.REVIEWKD.MID_CHANNELS must be a positive integer, got {r.MID_CHANNELS}")
    names = list(r.IN_FEATURES)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"KD.REVIEWKD.IN_FEATURES must be distinct feature names, at least one, got {names}")
    for size in r.HCL_LEVELS:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"KD.REVIEWKD.HCL_LEVELS must be positive integers (pooled sizes), got {r.HCL_LEVELS}")
    return bool(r.ENABLED)


def _validate_solver_steps(cfg: CN) -> None:
    """The learning-rate steps must fall inside the run (detectron2 would ignore later ones, or
    fail at MAX_ITER itself once the model is built)."""
    steps, max_iter = list(cfg.SOLVER.STEPS), cfg.SOLVER.MAX_ITER
    late = [s for s in steps if s >= max_iter]
    if late:
        raise ValueError(
            f"SOLVER.STEPS {tuple(steps)} must all be < SOLVER.MAX_ITER={max_iter} ({late} would never lower "
            f"the learning rate); e.g. SOLVER.STEPS \"({int(max_iter * 0.75)},)\" for MAX_ITER {max_iter}"
        )
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"SOLVER.STEPS must increase, got {tuple(steps)}")


# ---------------------------------------------------------------- files and batch size


def _local(path: str) -> bool:
    return bool(path) and "://" not in path


def check_weights_file(key: str, path: str, why: str = "") -> None:
    """``path`` (a config value) exists and starts like a torch/pickle file; errors name ``key``."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{key} {path!r} is a directory: name the checkpoint file in it{why}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} {path!r} does not exist{why}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save: a zip archive (b"PK") or, legacy and detectron2 model-zoo .pkl, a pickle (0x80).
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise ValueError(f"{key} {path!r} is not a checkpoint (neither a torch file nor a pickle; it starts "
                         f"with {head!r}){why}")


def check_input_files(cfg: CN, resume: bool = False, eval_only: bool = False) -> None:
    """Weight files named by the config exist and are checkpoints, before any model is built.

    TEACHER.MODEL.WEIGHTS when a teacher is built (checkpoints of this project hold the student
    only: the teacher is read from this file again on every start, ``--resume`` included);
    MODEL.WEIGHTS unless ``resume`` finds a ``last_checkpoint`` in OUTPUT_DIR. ``eval_only``:
    the student alone is evaluated, no teacher is read.
    """
    from deepkd_det.det.distill import parts_enabled  # here: the parts import this module

    # Every part builds the teacher (logits, ReviewKD, DiffKD, the dense-head parts, ...).
    teacher_needed = cfg.MODEL.META_ARCHITECTURE in WRAPPER_ARCHITECTURES and bool(parts_enabled(cfg)) and not eval_only
    t_path = cfg.TEACHER.MODEL.WEIGHTS
    if teacher_needed and _local(t_path):
        check_weights_file(
            "TEACHER.MODEL.WEIGHTS", t_path,
            " (the teacher is rebuilt from this file at every start, --resume included: checkpoints hold the "
            "student only)",
        )
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resuming and _local(cfg.MODEL.WEIGHTS):
        check_weights_file("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)


def lr_batch_warning(cfg: CN, file_batch: int, file_lr: float) -> Optional[str]:
    """A warning when the command line changed SOLVER.IMS_PER_BATCH but kept the config file's
    SOLVER.BASE_LR: the lr per image then grows (or shrinks) with it, and a shrunk batch at the
    full learning rate diverges. The linear scaling rule's lr is suggested."""
    batch, lr = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR
    if batch == file_batch or lr != file_lr or file_batch <= 0:
        return None
    return (
        f"SOLVER.IMS_PER_BATCH is {batch} but SOLVER.BASE_LR={lr:g} was set for {file_batch} images per batch: "
        f"the linear scaling rule gives SOLVER.BASE_LR {lr * batch / file_batch:g} (set it to silence this warning; "
        "a smaller batch at the same learning rate often diverges)"
    )


def _validate_diffkd(cfg: CN) -> bool:
    """Check KD.DIFFKD; return whether it is enabled. Feature names, strides and channels are
    checked against the built FPNs when the model is built."""
    d = cfg.KD.DIFFKD
    for key in ("LOSS_WEIGHT", "DIFF_WEIGHT", "AE_WEIGHT", "REG_WEIGHT", "DENSE_WEIGHT"):
        if not d[key] >= 0:
            raise ValueError(f"KD.DIFFKD.{key} must be >= 0, got {d[key]}")
    if int(d.AE_CHANNELS) != d.AE_CHANNELS or d.AE_CHANNELS < 0:
        raise ValueError(f"KD.DIFFKD.AE_CHANNELS must be 0 (no autoencoder) or a positive integer, got {d.AE_CHANNELS}")
    if int(d.INFERENCE_STEPS) != d.INFERENCE_STEPS or not 1 <= d.INFERENCE_STEPS <= 500:
        raise ValueError(f"KD.DIFFKD.INFERENCE_STEPS must be an integer in 1..500, got {d.INFERENCE_STEPS}")
    names = list(d.IN_FEATURES)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"KD.DIFFKD.IN_FEATURES must be distinct feature names, at least one, got {names}")
    outputs = list(d.DENSE_OUTPUTS)
    if len(set(outputs)) != len(outputs) or not set(outputs) <= {"cls", "reg"}:
        raise ValueError(f"KD.DIFFKD.DENSE_OUTPUTS must be distinct names among ('cls', 'reg'), got {outputs}")
    return bool(d.ENABLED)
