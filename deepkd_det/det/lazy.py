"""LazyConfig (detectron2's Python configs) front of the detection engine.

``tools/lazy_train_net.py`` reads a ``.py`` config with detectron2's common layout (``model``,
``dataloader``, ``optimizer``, ``lr_multiplier``, ``train``) plus ``deepkd``, the DEEPKD settings
(``deepkd_det.core.settings.deepkd_settings_dict()``: the keys, defaults and validation of the
yacs ``DEEPKD`` node), and optionally ``datasets`` (the yacs ``DATASETS.REGISTER`` /
``DATASETS.SHAPES`` keys of ``deepkd_det/det/data/config.py``). Everything that can be checked
before a model is built is checked here (:func:`setup`), with one line naming the key; the run
itself is the engine of ``train_net.py`` (``deepkd_det.det.engine.lazy.LazyDeepKDTrainer``).
See docs/lazyconfig.md.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from deepkd_det.core.amp import amp_dtype
from deepkd_det.core.cfgfile import ConfigError
from deepkd_det.core.io import check_output_dir
from deepkd_det.core.settings import deepkd_settings_from_mapping

from .config import check_weights_file, validate_detection_deepkd
from .engine.trainer import EngineSettings

__all__ = [
    "REQUIRED_NODES",
    "apply_overrides",
    "build_eval_model",
    "check_lazy_files",
    "cpu_fallback",
    "register_lazy_datasets",
    "data_cfg",
    "engine_settings",
    "lazy_deepkd_settings",
    "load_lazy_config",
    "prepare_model",
    "lazy_num_classes",
    "validate_lazy_config",
]

# detectron2's LazyConfig layout (configs/common/): the nodes a training config must have.
REQUIRED_NODES = ("model", "dataloader", "optimizer", "lr_multiplier", "train")
# train.* keys without a default: a missing one is refused (never a silent value).
REQUIRED_TRAIN_KEYS = ("output_dir", "max_iter", "device", "checkpointer.period", "eval_period")


def _is_lazy_call(node) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _did_you_mean(key: str, choices: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _check_override_key(cfg: DictConfig, key: str) -> None:
    """An override must name an existing key, or a new argument of a LazyCall (``model.x.y=...``
    adds a constructor argument, as detectron2 allows); a new key of a plain node (``train``,
    ``deepkd``, ...) is a typo, refused with the closest existing key."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
            node = node if isinstance(node, (DictConfig, ListConfig)) else None
            if node is None and depth < len(parts) - 1:
                raise ValueError(f"command line: {'.'.join(parts[:depth + 1])} is a value, not a node: cannot set {key}")
            if node is None:
                return
            continue
        parent = ".".join(parts[:depth])
        if isinstance(node, DictConfig) and _is_lazy_call(node) and depth == len(parts) - 1:
            return  # a new argument of a LazyCall
        choices = list(node.keys()) if isinstance(node, DictConfig) else []
        prefix = f"{parent}." if parent else ""
        raise ValueError(f"command line: unknown config key {key}{_did_you_mean(part, choices, prefix)}")


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """detectron2's ``a.b=c`` overrides (hydra's syntax), each key checked first
    (:func:`_check_override_key`); a malformed one is a ValueError naming it."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"command line: override {item!r} is not of the form key=value (e.g. train.max_iter=100)")
        _check_override_key(cfg, item.split("=", 1)[0].strip())
    try:
        return LazyConfig.apply_overrides(cfg, overrides)
    except Exception as exc:  # hydra's parser errors have no common user-facing base class
        raise ValueError(f"command line: {' '.join(str(exc).split())}") from None


def load_lazy_config(path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The LazyConfig of ``path`` (a ``.py`` config, or the ``config.yaml`` a run saved) with
    ``overrides`` applied. A missing file, or one that does not load, is one line naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config-file {path!r} does not exist")
    if not path.endswith((".py", ".yaml", ".yml")):
        raise ValueError(f"--config-file {path!r}: a LazyConfig is a .py file (or a saved config.yaml)")
    try:
        cfg = LazyConfig.load(path)
    except (SyntaxError, NameError, ImportError, AttributeError, TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    return apply_overrides(cfg, overrides)


def lazy_deepkd_settings(cfg: DictConfig, where: str):
    """The yacs DEEPKD node of ``cfg.deepkd`` (absent: the defaults, DeepKD off); unknown keys and
    wrong types are a ConfigError naming ``deepkd.<KEY>``."""
    node = cfg.get("deepkd")
    data = {} if node is None else OmegaConf.to_container(node, resolve=True)
    return deepkd_settings_from_mapping(data, where, prefix="deepkd")


def lazy_num_classes(model_cfg) -> Optional[int]:
    """The class count of the (student) detector a LazyConfig's ``model`` builds: R-CNN
    ``roi_heads.num_classes``, dense detectors' ``num_classes``; None when not stated."""
    node = model_cfg.get("student", model_cfg) if isinstance(model_cfg, DictConfig) else None
    if node is None:
        return None
    for path in ("roi_heads.num_classes", "num_classes", "head.num_classes"):
        value = OmegaConf.select(node, path, default=None)
        if isinstance(value, int):
            return value
    return None


def _dataset_names(node) -> List[str]:
    names = OmegaConf.select(node, "dataset.names", default=None) if isinstance(node, DictConfig) else None
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def data_cfg(cfg: DictConfig, eval_only: bool = False):
    """A detectron2 yacs config holding what the dataset side reads (deepkd_det/det/data):
    ``DATASETS.TRAIN`` / ``TEST`` from the dataloaders' ``dataset.names``, ``DATASETS.REGISTER``
    / ``SHAPES`` from the LazyConfig's ``datasets`` node (same keys), and the student's class
    count, so that the yacs path's registration and checks run unchanged."""
    from detectron2.config import get_cfg

    from .data import add_data_config

    ycfg = add_data_config(get_cfg())
    node = cfg.get("datasets")
    if node is not None:
        from deepkd_det.core.cfgfile import merge_dict

        data = OmegaConf.to_container(node, resolve=True)
        if not isinstance(data, dict):
            raise ValueError(f"datasets must be a mapping with REGISTER / SHAPES, got {data!r}")
        merge_dict(ycfg.DATASETS, data, "config", prefix="datasets.")
    dl = cfg.dataloader
    ycfg.DATASETS.TRAIN = () if eval_only else tuple(_dataset_names(dl.get("train")))
    ycfg.DATASETS.TEST = tuple(_dataset_names(dl.get("test")))
    num = lazy_num_classes(cfg.model)
    if num is not None:
        ycfg.MODEL.ROI_HEADS.NUM_CLASSES = num
    return ycfg


def _target(node):
    """The callable of a LazyCall node (its ``_target_``, located when a string), else None."""
    if not _is_lazy_call(node):
        return None
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:  # detectron2's locate raises ImportError or a plain Exception
            return None
    return target


def is_distill_model(model_cfg) -> bool:
    """Whether ``model`` builds the distillation wrapper (``distill_detector``)."""
    from .distill.lazy import distill_detector

    return _target(model_cfg) is distill_detector


def _teacher_from_file(model_cfg) -> bool:
    """The checkpointer's teacher rule (train_net.py's teacher_read_from_file): a teacher read
    from its file at every start stays out of the checkpoints; a random test teacher stays in."""
    teacher = model_cfg.get("teacher") if is_distill_model(model_cfg) else None
    if not isinstance(teacher, DictConfig):
        return True
    return bool(teacher.get("weights")) or not teacher.get("allow_random_init", False)


def prepare_model(cfg: DictConfig, where: str) -> None:
    """A ``distill_detector`` model gets the run's ``max_iter`` (train.max_iter), the DEEPKD node
    (``deepkd``) and the base momentum (optimizer.momentum) — a different value stated in the
    model node is refused naming both —, and its parts are validated now, before any model is
    built (deepkd_det/det/distill/lazy.py ``parts_config``). A plain detector with
    deepkd.ENABLED is refused (nothing to decouple)."""
    from detectron2.config import instantiate

    from .distill.lazy import parts_config

    model = cfg.model
    if not is_distill_model(model):
        if cfg.get("deepkd") is not None and cfg.deepkd.get("ENABLED", False):
            raise ValueError(f"{where}: deepkd.ENABLED needs distillation losses, but model is not "
                             "distill_detector (deepkd_det.det.distill.lazy) with a logit part")
        return
    injected = {
        "max_iter": cfg.train.max_iter,
        "deepkd": OmegaConf.to_container(cfg.deepkd, resolve=True) if cfg.get("deepkd") is not None else None,
        "momentum": float(OmegaConf.select(cfg, "optimizer.momentum", default=0.9)),
    }
    source = {"max_iter": "train.max_iter", "deepkd": "deepkd", "momentum": "optimizer.momentum"}
    for key, value in injected.items():
        stated = model.get(key)
        if stated is not None:
            stated = OmegaConf.to_container(stated, resolve=True) if isinstance(stated, (DictConfig, ListConfig)) else stated
            if stated != value:
                raise ValueError(f"{where}: model.{key} is {stated!r} but {source[key]} is {value!r}: leave "
                                 f"model.{key} out (it is taken from {source[key]})")
        model[key] = value
    specs = [instantiate(p) for p in model.get("parts") or []]
    student = model.get("student")
    arch = getattr(_target(student), "__name__", "GeneralizedRCNN")
    parts_config(specs, injected["deepkd"], arch, lazy_num_classes(model), injected["max_iter"], injected["momentum"])
    teacher = model.get("teacher")
    if isinstance(teacher, DictConfig):
        weights = teacher.get("weights")
        if _local(weights):
            check_weights_file("model.teacher.weights", weights,
                               " (the teacher is rebuilt from this file at every start, --resume included: "
                               "checkpoints hold the student only)")


def engine_settings(cfg: DictConfig, deepkd) -> EngineSettings:
    """What the shared engine reads, from ``train`` / ``dataloader.train``."""
    t = cfg.train
    amp = t.get("amp") or {}
    return EngineSettings(
        output_dir=t.output_dir,
        max_iter=int(t.max_iter),
        ims_per_batch=int(OmegaConf.select(cfg, "dataloader.train.total_batch_size", default=0) or 0),
        checkpoint_period=int(t.checkpointer.period),
        eval_period=int(t.eval_period),
        deepkd=deepkd,
        amp=amp_dtype(amp.get("dtype", "fp16"), "train.amp.dtype") if amp.get("enabled", False) else None,
        init_weights=t.get("init_checkpoint", "") or "",
        teacher_from_file=_teacher_from_file(cfg.model),
        log_period=int(t.get("log_period", 20)),
        max_to_keep=t.checkpointer.get("max_to_keep"),
        ddp={k: v for k, v in (t.get("ddp") or {}).items() if k in ("broadcast_buffers", "find_unused_parameters")},
    )


def validate_lazy_config(cfg: DictConfig, where: str, eval_only: bool = False) -> Tuple[Any, EngineSettings]:
    """Start-up checks of a LazyConfig, before anything is built or written: the layout, the
    ``train`` keys without a default (``max_iter`` above all), the DEEPKD settings (the yacs
    node's validation, messages naming ``deepkd.<KEY>`` and ``optimizer.momentum``), the AMP
    dtype and the output folder. Returns ``(DEEPKD node, engine settings)``."""
    missing = [n for n in REQUIRED_NODES if n not in cfg]
    if eval_only:
        missing = [n for n in missing if n in ("model", "dataloader", "train")]
    if missing:
        raise ValueError(f"{where}: the config has no {', '.join(missing)} (detectron2's LazyConfig layout: "
                         f"{', '.join(REQUIRED_NODES)}; see configs/DEEPKD/lazy/)")
    for key in REQUIRED_TRAIN_KEYS:
        if OmegaConf.select(cfg.train, key, default=None) is None:
            raise ValueError(f"{where}: train.{key} is not set (no default: state it in the config)")
    max_iter = cfg.train.max_iter
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"train.max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(cfg.train.checkpointer.period, int) or cfg.train.checkpointer.period < 1:
        raise ValueError(f"train.checkpointer.period must be a positive integer, got {cfg.train.checkpointer.period!r}")
    try:
        deepkd = lazy_deepkd_settings(cfg, where)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not eval_only:
        momentum = OmegaConf.select(cfg, "optimizer.momentum", default=0.0)
        validate_detection_deepkd(deepkd, float(momentum), lazy_num_classes(cfg.model) or 0,
                                  prefix="deepkd", momentum_key="optimizer.momentum")
        prepare_model(cfg, where)
    settings = engine_settings(cfg, deepkd)
    check_output_dir(settings.output_dir, "train.output_dir")
    if not eval_only:
        from detectron2.config import instantiate

        instantiate(cfg.lr_multiplier)  # its own checks (steps inside the run), before any model
    return deepkd, settings


def cpu_fallback(cfg: DictConfig) -> bool:
    """``train.device`` cuda on a machine without CUDA: set to cpu (the same config runs on a
    CPU machine, as train_net.py's MODEL.DEVICE). Returns whether it changed."""
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
        return True
    return False


def register_lazy_datasets(cfg: DictConfig, eval_only: bool = False) -> None:
    """Register (and check) the datasets the dataloaders name, as train_net.py does: the
    ``datasets`` node's REGISTER entries and the shapes set, json / images present, the class
    count equal to the student's, training images annotated."""
    from .data import check_num_classes, check_training_annotations, register_datasets_from_cfg

    ycfg = data_cfg(cfg, eval_only)
    register_datasets_from_cfg(ycfg)
    if lazy_num_classes(cfg.model) is not None:
        check_num_classes(ycfg, list(ycfg.DATASETS.TRAIN) + list(ycfg.DATASETS.TEST))
    check_training_annotations(ycfg.DATASETS.TRAIN)


def _local(path) -> bool:
    return isinstance(path, str) and bool(path) and "://" not in path


def check_lazy_files(cfg: DictConfig, resume: bool = False, eval_only: bool = False) -> None:
    """Weight files the config names exist and are checkpoints, before any model is built (the
    check of the yacs path, deepkd_det/det/config.py): ``train.init_checkpoint`` unless a
    ``--resume`` finds a ``last_checkpoint``."""
    resuming = resume and os.path.isfile(os.path.join(cfg.train.output_dir, "last_checkpoint"))
    init = cfg.train.get("init_checkpoint", "")
    if not resuming and _local(init):
        check_weights_file("train.init_checkpoint", init)


def build_eval_model(cfg: DictConfig):
    """The detector evaluated by ``--eval-only``: the student alone (``model.student`` of a
    distillation wrapper: no teacher, no training-only part is built), else ``model``."""
    from detectron2.config import instantiate

    node = cfg.model.student if "student" in cfg.model else cfg.model
    model = instantiate(node)
    model.to(cfg.train.device)
    return model


def multistep_lr(steps: Sequence[int], max_iter: int, warmup_iters: int = 0, gamma: float = 0.1,
                 warmup_factor: float = 0.001, warmup_method: str = "linear"):
    """The learning-rate multiplier of the yacs SOLVER keys (STEPS, MAX_ITER, WARMUP_ITERS, GAMMA,
    WARMUP_FACTOR, WARMUP_METHOD) as detectron2's ``build_lr_scheduler`` builds it, for a
    LazyConfig's ``lr_multiplier = L(multistep_lr)(steps=[...], max_iter="${train.max_iter}")``.
    Steps outside the run are refused naming them (as the yacs path's SOLVER.STEPS)."""
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    steps = [int(s) for s in steps]
    late = [s for s in steps if s >= max_iter]
    if late or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"lr_multiplier.steps {steps} must increase and lie below train.max_iter={max_iter}")
    sched = MultiStepParamScheduler(values=[gamma**k for k in range(len(steps) + 1)], milestones=steps,
                                    num_updates=max_iter)
    return WarmupParamScheduler(sched, warmup_factor, min(warmup_iters / max_iter, 1.0), warmup_method)
