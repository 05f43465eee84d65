"""DistillDetector from a LazyConfig: student and teacher any detectron2 LazyConfig models, the
distillation parts listed in the config.

    model = L(distill_detector)(
        student=L(GeneralizedRCNN)(...),                       # any detectron2 detector
        teacher=L(teacher_from)(model=L(GeneralizedRCNN)(...), weights="teacher.pth"),
        parts=[L(part)(name="logits", TYPE="DKD", ALPHA=1.0, BETA=0.25)],
    )

A part is named (its ``DistillPart.name``: logits, reviewkd, diffkd, regkd, dense_logits,
dense_diffkd) with its settings under the yacs ``KD`` node's names (``part(name="reviewkd",
REVIEWKD=dict(ENABLED=True, LOSS_WEIGHT=1.2))``): each part is built by its own
``from_config`` on the yacs config those keys make, with the DEEPKD node of the LazyConfig
(``deepkd``) and the run's ``max_iter`` (``tools/lazy_train_net.py`` fills both in from
``deepkd`` and ``train.max_iter``), so names, defaults and validation are the yacs path's. The
teacher's weights follow the yacs rule (deepkd_det/det/weights/teacher.py ``load_teacher_from``).
Only the listed parts are built (a part the keys turn on but the list leaves out is not).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from deepkd_det.core.amp import AMP_DTYPES
from deepkd_det.core.cfgfile import flatten
from deepkd_det.det.config import DENSE_ARCHITECTURES, get_deepkd_cfg, validate_deepkd_config
from deepkd_det.det.modeling.teacher import Teacher
from deepkd_det.det.weights.teacher import load_teacher_from

from .parts.base import DISTILL_PART_REGISTRY, part_order
from .wrapper import DistillDetector

__all__ = ["LAZY_TEACHER_KEYS", "PartSpec", "distill_detector", "part", "parts_config", "part_names", "teacher_from"]

# The teacher-weight settings of a LazyConfig, named in the messages of load_teacher_from.
LAZY_TEACHER_KEYS = {"weights": "model.teacher.weights", "student_weights": "train.init_checkpoint",
                     "allow_random_init": "model.teacher.allow_random_init"}


class PartSpec:
    """A part of the list: its name and its settings (yacs ``KD`` node names, relative to KD).
    (A plain class: omegaconf would turn a dataclass back into a config node.)"""

    def __init__(self, name: str, keys: Optional[Dict[str, Any]] = None):
        self.name = name
        self.keys = dict(keys or {})

    def __repr__(self) -> str:
        return f"PartSpec({self.name!r}, {self.keys!r})"


def part_names() -> Dict[str, str]:
    """``{part name: registry name}`` of every registered part (the registry name works too)."""
    out = {}
    for reg in part_order():
        out[DISTILL_PART_REGISTRY.get(reg).name or reg] = reg
        out[reg] = reg
    return out


def part(name: str, **keys) -> PartSpec:
    """A distillation part for ``distill_detector(parts=[...])`` (module docstring)."""
    return PartSpec(str(name), _plain(keys))


def _plain(value):
    """omegaconf containers (what instantiate may pass) as plain dicts and lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - detectron2 depends on omegaconf
        pass
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _architecture(student) -> str:
    return student if isinstance(student, str) else type(student).__name__


def student_class_count(student: nn.Module) -> Optional[int]:
    """The built detector's class count (R-CNN ROI heads, else the dense detector's)."""
    rh = getattr(student, "roi_heads", None)
    if rh is not None and hasattr(rh, "num_classes"):
        return int(rh.num_classes)
    num = getattr(student, "num_classes", None)
    return int(num) if num is not None else None


def parts_config(specs: Sequence[PartSpec], deepkd: Optional[Mapping], architecture: str, num_classes: Optional[int],
                 max_iter: int, momentum: float = 0.9, where: str = "model.parts"):
    """The yacs config the listed parts are built from: the ``KD`` keys of every spec (a key two
    specs set differently is refused), ``DEEPKD`` from ``deepkd``, the student's architecture and
    class count, SOLVER.MAX_ITER / MOMENTUM; validated as train_net.py validates its config."""
    from deepkd_det.core.cfgfile import ConfigError, merge_dict

    names = part_names()
    cfg = get_deepkd_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DistillDetector"
    cfg.KD.STUDENT_ARCHITECTURE = architecture
    cfg.KD.TYPE = "NONE"  # every part off unless a listed part's keys turn it on
    cfg.SOLVER.MAX_ITER = int(max_iter)
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.MOMENTUM = float(momentum)
    if num_classes is not None:
        key = DENSE_ARCHITECTURES.get(architecture, "MODEL.ROI_HEADS.NUM_CLASSES")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:  # e.g. MODEL.FCOS: detectron2 has no yacs keys for FCOS
                node[p] = type(node)()
            node = node[p]
        node[leaf] = int(num_classes)
    seen: Dict[str, Any] = {}
    try:
        for i, spec in enumerate(specs):
            if not isinstance(spec, PartSpec):
                raise ValueError(f"{where}[{i}] must be L(part)(name=..., ...) (deepkd_det.det.distill.lazy.part), "
                                 f"got {type(spec).__name__}")
            if spec.name not in names:
                raise ValueError(f"{where}[{i}]: unknown part {spec.name!r}; the parts are "
                                 f"{sorted(DISTILL_PART_REGISTRY.get(r).name for r in part_order())}")
            for dotted, value in flatten(spec.keys).items():
                if dotted in seen and seen[dotted] != value:
                    raise ValueError(f"{where}: KD.{dotted} is {seen[dotted]!r} in one part and {value!r} in "
                                     f"{where}[{i}] ({spec.name})")
                seen[dotted] = value
            merge_dict(cfg.KD, spec.keys, f"{where}[{i}] ({spec.name})", prefix="")
        if deepkd:
            merge_dict(cfg.DEEPKD, dict(deepkd), "deepkd", prefix="deepkd.")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    try:
        validate_deepkd_config(cfg)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (the part settings use the yacs KD names)") from None
    for i, spec in enumerate(specs):
        if not DISTILL_PART_REGISTRY.get(names[spec.name]).enabled(cfg):
            raise ValueError(f"{where}[{i}] ({spec.name}): its settings {spec.keys} leave the part off "
                             "(e.g. TYPE='DKD' for logits, REVIEWKD=dict(ENABLED=True) for reviewkd)")
    return cfg


def teacher_from(model: nn.Module, weights: str = "", student_weights: str = "", allow_random_init: bool = False,
                 input_format: Optional[str] = None, fold_norm: bool = True, channels_last: bool = False,
                 amp_dtype: str = "") -> Teacher:
    """A frozen teacher around the detectron2 detector ``model`` (any LazyConfig model), its
    weights loaded by the yacs path's rule (``load_teacher_from``; messages name the LazyConfig
    keys): ``weights``, else the teacher keys of ``student_weights`` (``"${train.init_checkpoint}"``,
    a combined release file), else refused unless ``allow_random_init``. Normalisation and input
    format are the detector's own unless ``input_format`` is given."""
    if amp_dtype and amp_dtype not in AMP_DTYPES:
        raise ValueError(f"model.teacher.amp_dtype must be '' or one of {tuple(AMP_DTYPES)}, got {amp_dtype!r}")
    mean, std = getattr(model, "pixel_mean", None), getattr(model, "pixel_std", None)
    if mean is None or std is None:
        raise ValueError(f"model.teacher.model ({type(model).__name__}) has no pixel_mean / pixel_std")
    teacher = Teacher(
        model,
        pixel_mean=mean.flatten().tolist(),
        pixel_std=std.flatten().tolist(),
        input_format=input_format or getattr(model, "input_format", "BGR"),
        fold_norm=fold_norm,
        channels_last=channels_last,
        amp_dtype=AMP_DTYPES[amp_dtype] if amp_dtype else None,
    )
    load_teacher_from(teacher, weights or "", student_weights or "", bool(allow_random_init), keys=LAZY_TEACHER_KEYS)
    return teacher


def distill_detector(*, student: nn.Module, teacher: Optional[Teacher] = None, parts: Sequence[PartSpec] = (),
                     max_iter: Optional[int] = None, deepkd: Optional[Mapping] = None,
                     momentum: float = 0.9, input_format: Optional[str] = None) -> DistillDetector:
    """DistillDetector of ``student``, ``teacher`` and the listed ``parts`` (module docstring).
    ``max_iter`` (the run's iterations: the top-k schedule's progress) has no default; ``deepkd``
    is the LazyConfig's DEEPKD node (None: the defaults, DeepKD off). ``input_format``: the
    channel order of the images, for a student that states none (FCOS); the teacher's images
    are converted from it."""
    if getattr(student, "input_format", None) is None:
        if input_format is None:
            raise ValueError(f"model.student ({type(student).__name__}) states no input_format: set "
                             "model.input_format to the dataloader's image_format ('BGR' or 'RGB')")
        student.input_format = input_format
    elif input_format is not None and input_format != student.input_format:
        raise ValueError(f"model.input_format {input_format!r} differs from the student's {student.input_format!r}")
    if max_iter is None:
        raise ValueError("model.max_iter is not set: it is the run's train.max_iter (tools/lazy_train_net.py "
                         "fills it in), no default")
    specs: List[PartSpec] = list(parts)
    if specs and teacher is None:
        raise ValueError(f"the distillation parts {[s.name for s in specs]} need a teacher (model.teacher)")
    cfg = parts_config(specs, _plain(deepkd) if deepkd is not None else None, _architecture(student),
                       student_class_count(student), int(max_iter), momentum)
    names = part_names()
    wanted = {names[s.name] for s in specs}
    built = []
    for reg in part_order():  # the build order of the yacs path (it fixes the random initialisation)
        if reg in wanted:
            built.append(DISTILL_PART_REGISTRY.get(reg).from_config(cfg, student, teacher))
    return DistillDetector(student=student, teacher=teacher, parts=built, max_iter=int(max_iter))
