"""Dataset registration from the config, with clear start-up errors for bad files.

detectron2 registers datasets lazily: a wrong path only fails deep inside the first data
loader, or when evaluation starts hours later. ``register_datasets_from_cfg`` registers the
``DATASETS.REGISTER`` entries and the embedded shapes set, then checks that every dataset named
in ``DATASETS.TRAIN`` / ``TEST`` is registered and that its json and image folder exist.

A COCO json registered here is read once at registration (``inspect_coco_json``) and refused,
with its path and the first offending entries named, when it is not valid JSON, lacks
``images`` / ``annotations`` / ``categories``, lists an image file that is not in the image
folder, lists an image file that does not open as a complete image of the json's width and height
(``image_problem``: header and end only, no decoding), or holds a box of non-positive width or
height, or reaching more than ``BOX_TOLERANCE`` pixels outside its image (detectron2 would train on another box, silently: e.g. a box written
as ``[x0, y0, x1, y1]`` instead of ``[x, y, w, h]``). Bad boxes are refused, not dropped: the
fix belongs in the json. A ``segmentation``, where an annotation has one, must be COCO polygons
(lists of at least three x, y pairs) or an RLE of its image's size: detectron2 would drop the
object otherwise. ``check_num_classes`` compares the class count of the detector's head
(MODEL.ROI_HEADS.NUM_CLASSES, MODEL.RETINANET.NUM_CLASSES for RetinaNet, MODEL.FCOS.NUM_CLASSES
where the config has it) with the categories of the datasets (``resolve_num_classes``: 0 takes the
count from the json); ``check_training_annotations``: a training json must annotate at least one
image; ``check_mask_annotations``: with MODEL.MASK_ON every annotation needs a ``segmentation``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from .config import add_data_config
from .synthetic import SHAPES_TRAIN, SHAPES_VAL, generate_shapes_dataset, shapes_split_paths

__all__ = [
    "BOX_TOLERANCE",
    "CLASS_COUNT_HEADS",
    "check_dataset_paths",
    "check_mask_annotations",
    "class_count_key",
    "needs_class_count",
    "check_num_classes",
    "check_training_annotations",
    "image_problem",
    "inspect_coco_json",
    "prepare_shapes_dataset",
    "register_coco_dataset",
    "register_datasets_from_cfg",
    "resolve_num_classes",
]

logger = logging.getLogger(__name__)
# Names registered by this module: they may be re-registered (another path, a new test dir);
# names registered by anyone else (detectron2's builtin COCO, user code) are never replaced.
_OWN_NAMES: set = set()

# Pixels a box may reach outside its image (rounding of converted annotations).
BOX_TOLERANCE = 1.0
# How many offending entries an error lists.
_SHOWN = 3

_COCO_HINT = (
    "detectron2 looks for its builtin datasets under $DETECTRON2_DATASETS (now {root!r}): COCO 2017 goes to "
    "{root}/coco/{{train2017,val2017,annotations}} (see datasets/README.md)."
)


def _require_paths(name: str, json_file: str, image_root: str, origin: str, hint: str = "") -> None:
    problems = []
    if not os.path.isfile(json_file):
        problems.append(f"annotation file {json_file!r} does not exist")
    if not os.path.isdir(image_root):
        problems.append(f"image folder {image_root!r} does not exist")
    if problems:
        raise FileNotFoundError(f"dataset {name!r} ({origin}): " + "; ".join(problems) + (f". {hint}" if hint else ""))


def _first(items: List[str], total: int) -> str:
    more = f" (and {total - len(items)} more)" if total > len(items) else ""
    return "; ".join(items) + more


# How far from a file's end its end-of-image marker may lie (bytes some writers append after it).
_TAIL = 1024
# The EXIF orientations that swap width and height (detectron2 applies them when it reads an image).
_TRANSPOSED = (5, 6, 7, 8)


def image_problem(path: str, width: float, height: float) -> Optional[str]:
    """None if ``path`` opens as an image of ``width`` x ``height`` (after its EXIF orientation,
    as detectron2 reads it) and is complete; else what is wrong, in a few words.

    Cheap: PIL reads the header only; completeness is the end-of-image marker within the file's
    last ``_TAIL`` bytes for JPEG (``FF D9``, which entropy-coded data cannot contain) and PNG
    (the ``IEND`` chunk), so a file cut short by a copy or a download is caught without decoding
    it. Other formats are decoded in full.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            if fmt in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") and im.getexif().get(0x0112, 1) in _TRANSPOSED:
                w, h = h, w
            if fmt not in ("JPEG", "MPO", "PNG"):
                im.load()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
        return f"not a readable image ({exc})"
    if (w, h) != (int(width), int(height)):
        return f"{w}x{h} pixels, the json says {int(width)}x{int(height)}"
    if fmt in ("JPEG", "MPO", "PNG"):
        marker = b"IEND" if fmt == "PNG" else b"\xff\xd9"
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - _TAIL))
            if marker not in f.read():
                return f"truncated (no {fmt} end-of-image marker at its end)"
    return None


def _segmentation_problem(segm, width: float, height: float) -> Optional[str]:
    """None for COCO polygons ``[[x1, y1, x2, y2, x3, y3, ...], ...]`` or an RLE of the image's
    size (``{"size": [height, width], "counts": ...}``); else what is wrong."""
    if isinstance(segm, dict):
        size = segm.get("size")
        if "counts" not in segm or not isinstance(size, (list, tuple)) or len(size) != 2:
            return "an RLE segmentation needs 'counts' and 'size' [height, width]"
        if [int(v) for v in size] != [int(height), int(width)]:
            return f"RLE size {list(size)} is not the image's [height, width] [{int(height)}, {int(width)}]"
        return None
    if not isinstance(segm, list) or not segm:
        return "segmentation is neither a list of polygons nor an RLE dict"
    for poly in segm:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            return "each polygon is a flat list [x1, y1, x2, y2, ...] of at least 3 points"
        try:
            if not all(math.isfinite(float(v)) for v in poly):
                return "polygon coordinates must be finite numbers"
        except (TypeError, ValueError):
            return "polygon coordinates must be numbers"
    return None


def inspect_coco_json(name: str, json_file: str, image_root: str) -> Tuple[List[str], int]:
    """Read a COCO instances json and check it (see the module docstring); returns the category
    names in detectron2's order (sorted by id) and how many images have an annotation. Errors name
    the dataset and the file."""
    classes, annotated, _ = _inspect_coco_json(name, json_file, image_root)
    return classes, annotated


def _inspect_coco_json(name: str, json_file: str, image_root: str) -> Tuple[List[str], int, List]:
    """``inspect_coco_json``, plus the ids of the annotations without a ``segmentation``."""
    where = f"dataset {name!r} ({json_file})"
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a COCO json is an object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{where}: no {missing} list (a COCO instances json has images, annotations, categories)")
    categories = data["categories"]
    try:
        cat_ids = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: every category needs an integer 'id' and a 'name'") from None
    if not cat_ids:
        raise ValueError(f"{where}: no categories")
    images: Dict[int, dict] = {}
    absent, malformed, unreadable = [], [], []
    for img in data["images"]:
        try:
            images[int(img["id"])] = img
            size = float(img["width"]), float(img["height"])
            file_name = str(img["file_name"])
        except (KeyError, TypeError, ValueError):
            malformed.append(repr(img)[:120])
            continue
        if not (size[0] > 0 and size[1] > 0):
            malformed.append(f"{file_name}: width/height {size}")
        path = os.path.join(image_root, file_name)
        if not os.path.isfile(path):
            absent.append(file_name)
        elif size[0] > 0 and size[1] > 0:
            problem = image_problem(path, *size)
            if problem:
                unreadable.append(f"{file_name}: {problem}")
    if malformed:
        raise ValueError(f"{where}: {len(malformed)} image entries without a valid id, file_name, width and "
                         f"height: {_first(malformed[:_SHOWN], len(malformed))}")
    if absent:
        raise FileNotFoundError(
            f"{where}: {len(absent)} of {len(images)} images are not in the image folder {image_root!r}: "
            f"{_first(absent[:_SHOWN], len(absent))}"
        )
    if unreadable:
        raise ValueError(f"{where}: {len(unreadable)} of {len(images)} images do not open as complete images of "
                         f"the json's size: {_first(unreadable[:_SHOWN], len(unreadable))}")
    bad: List[str] = []
    unsegmented: List = []
    tol = BOX_TOLERANCE
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        try:
            image = images.get(int(ann["image_id"]))
            box = [float(v) for v in ann["bbox"]]
            category = int(ann["category_id"])
        except (KeyError, TypeError, ValueError):
            bad.append(f"annotation {ann_id}: needs image_id, category_id and bbox [x, y, w, h]")
            continue
        if image is None:
            bad.append(f"annotation {ann_id}: image_id {ann['image_id']} is not among the images")
            continue
        if category not in cat_ids:
            bad.append(f"annotation {ann_id} ({image['file_name']}): category_id {category} is not among the "
                       f"categories {sorted(cat_ids)}")
            continue
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            bad.append(f"annotation {ann_id} ({image['file_name']}): bbox {ann['bbox']} is not 4 finite numbers")
            continue
        x, y, w, h = box
        width, height = float(image["width"]), float(image["height"])
        if w <= 0 or h <= 0:
            bad.append(f"annotation {ann_id} ({image['file_name']}): bbox {ann['bbox']} has non-positive width "
                       "or height (bbox is [x, y, width, height])")
        elif x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            bad.append(f"annotation {ann_id} ({image['file_name']}): bbox {ann['bbox']} reaches outside the "
                       f"{width:g}x{height:g} image")
        if "segmentation" not in ann:
            unsegmented.append(ann_id)
            continue
        problem = _segmentation_problem(ann["segmentation"], width, height)
        if problem:
            bad.append(f"annotation {ann_id} ({image['file_name']}): {problem}")
    if bad:
        raise ValueError(f"{where}: {len(bad)} bad annotations (fix or remove them in the json): "
                         f"{_first(bad[:_SHOWN], len(bad))}")
    annotated = {int(a["image_id"]) for a in data["annotations"]}
    return [cat_ids[i] for i in sorted(cat_ids)], len(annotated), unsegmented


def register_coco_dataset(name: str, json_file: str, image_root: str, *, check: bool = True) -> None:
    """Register a COCO instances json + image folder under ``name`` (detectron2's loader).

    With ``check`` the paths must exist now and the json is inspected (``inspect_coco_json``).
    Re-registering a name this function registered before replaces it; a name registered
    elsewhere (e.g. ``coco_2017_train``) is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if check:
        _require_paths(name, json_file, image_root, "DATASETS.REGISTER")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if name not in _OWN_NAMES:
            raise ValueError(
                f"dataset name {name!r} is already registered (by detectron2 or other code); "
                "choose another name for your dataset"
            )
        if getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    classes, annotated, unsegmented = _inspect_coco_json(name, json_file, image_root) if check else (None, None, None)
    register_coco_instances(name, {}, json_file, image_root)
    if classes is not None:
        # The same list detectron2's loader sets when it reads the json (sorted by category id).
        MetadataCatalog.get(name).set(thing_classes=classes, annotated_images=annotated,
                                      unsegmented_annotations=unsegmented)
    _OWN_NAMES.add(name)


def prepare_shapes_dataset(cfg) -> None:
    """Generate the shapes set described by cfg.DATASETS.SHAPES (main process; others wait) and
    register its two splits."""
    from detectron2.utils import comm

    s = cfg.DATASETS.SHAPES
    if comm.is_main_process():
        generate_shapes_dataset(s.ROOT, s.NUM_TRAIN, s.NUM_VAL, s.IMAGE_SIZE, s.SEED, s.MAX_OBJECTS,
                                num_classes=s.NUM_CLASSES)
    comm.synchronize()
    for name, split in ((SHAPES_TRAIN, "train"), (SHAPES_VAL, "val")):
        json_file, image_dir = shapes_split_paths(s.ROOT, split)
        register_coco_dataset(name, json_file, image_dir)


def _names_in(cfg) -> Sequence[str]:
    return list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)


def check_dataset_paths(names: Iterable[str]) -> None:
    """Every name must be registered; COCO-style ones must have their json and image folder."""
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise KeyError(
                f"dataset {name!r} (in DATASETS.TRAIN/TEST) is not registered. Register a COCO json + image "
                "folder with DATASETS.REGISTER [[name, json_file, image_dir]], use the embedded "
                f"{SHAPES_TRAIN!r}/{SHAPES_VAL!r}, or one of detectron2's builtin names (e.g. coco_2017_train)"
            )
        meta = MetadataCatalog.get(name)
        json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
        if json_file is None or image_root is None:
            continue  # not a json + folder dataset (registered by code); nothing to check
        if name in _OWN_NAMES:
            _require_paths(name, json_file, image_root, "DATASETS.REGISTER")
        else:
            root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
            _require_paths(name, json_file, image_root, "detectron2 builtin", _COCO_HINT.format(root=root))


def register_datasets_from_cfg(cfg) -> None:
    """Register DATASETS.REGISTER entries (and the shapes set if used), then check every dataset
    of DATASETS.TRAIN/TEST. Raises FileNotFoundError / KeyError / ValueError with the name."""
    if "REGISTER" not in cfg.DATASETS or "SHAPES" not in cfg.DATASETS:
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        add_data_config(cfg)
        if was_frozen:
            cfg.freeze()
    for entry in cfg.DATASETS.REGISTER:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(
                f"DATASETS.REGISTER entries must be [name, json_file, image_dir], got {entry!r}"
            )
        name, json_file, image_root = entry
        register_coco_dataset(str(name), str(json_file), str(image_root))
    if any(n in (SHAPES_TRAIN, SHAPES_VAL) for n in _names_in(cfg)):
        prepare_shapes_dataset(cfg)
    check_dataset_paths(_names_in(cfg))


def check_training_annotations(names: Iterable[str]) -> None:
    """Each dataset of ``names`` (DATASETS.TRAIN) whose json was inspected annotates at least one
    image (detectron2 drops images without annotations from training and would stop with "No valid
    data found" once the run has started)."""
    for name in names:
        if getattr(MetadataCatalog.get(name), "annotated_images", None) == 0:
            raise ValueError(f"dataset {_describe(name)} (DATASETS.TRAIN): no image has an annotation, "
                             "so there is nothing to train on")


def check_mask_annotations(cfg, names: Iterable[str]) -> None:
    """With MODEL.MASK_ON, every annotation of each dataset of ``names`` whose json was inspected
    has a ``segmentation`` (detectron2 would stop with a KeyError in the data loader, or in the
    ``segm`` evaluation, once the run has started)."""
    if not cfg.MODEL.MASK_ON:
        return
    for name in names:
        missing = getattr(MetadataCatalog.get(name), "unsegmented_annotations", None)
        if missing:
            raise ValueError(
                f"MODEL.MASK_ON needs a mask for every object, but dataset {_describe(name)} has {len(missing)} "
                f"annotations without a 'segmentation' (ids {_first([str(i) for i in missing[:_SHOWN]], len(missing))}): "
                "add polygons or RLE masks to the json, or train a detector without masks (MODEL.MASK_ON False)"
            )


def _dataset_classes(name: str) -> Optional[List[str]]:
    meta = MetadataCatalog.get(name)
    classes = getattr(meta, "thing_classes", None)
    return list(classes) if classes is not None else None


def _describe(name: str) -> str:
    json_file = getattr(MetadataCatalog.get(name), "json_file", None)
    return f"{name!r} ({json_file})" if json_file else repr(name)


# Heads whose NUM_CLASSES is a class count under MODEL (FCOS: where the config has the node).
CLASS_COUNT_HEADS = ("ROI_HEADS", "RETINANET", "FCOS")
# Meta-architectures whose class count is not ROI_HEADS.NUM_CLASSES.
_DENSE_HEADS = {"RetinaNet": "RETINANET", "FCOS": "FCOS"}
# The distillation wrapper: its student is KD.STUDENT_ARCHITECTURE.
_WRAPPERS = ("DeepKDRCNN", "DistillDetector")


def class_count_key(cfg) -> str:
    """``MODEL.<HEAD>.NUM_CLASSES``, the class count of the student detector (through the
    distillation wrapper, its KD.STUDENT_ARCHITECTURE): RETINANET for RetinaNet, FCOS for FCOS,
    ROI_HEADS otherwise."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in _WRAPPERS and "KD" in cfg:
        arch = cfg.KD.get("STUDENT_ARCHITECTURE", "GeneralizedRCNN")
    return f"MODEL.{_DENSE_HEADS.get(arch, 'ROI_HEADS')}.NUM_CLASSES"


def _class_count_nodes(cfg):
    """``(dotted key, head node)`` of every class count of the student's and the teacher's MODEL."""
    models = [("MODEL", cfg.MODEL)]
    if "TEACHER" in cfg:
        models.append(("TEACHER.MODEL", cfg.TEACHER.MODEL))
    return [(f"{prefix}.{head}.NUM_CLASSES", model[head]) for prefix, model in models
            for head in CLASS_COUNT_HEADS if head in model and "NUM_CLASSES" in model[head]]


def needs_class_count(cfg) -> bool:
    """Whether a class count of the config is 0 (taken from the dataset json at start-up)."""
    return any(node.NUM_CLASSES == 0 for _, node in _class_count_nodes(cfg))


def _get_key(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve_num_classes(cfg) -> None:
    """Every class count that is 0 (MODEL.ROI_HEADS / RETINANET / FCOS.NUM_CLASSES and the same
    under TEACHER.MODEL): the number of categories of the first dataset of DATASETS.TRAIN (else
    TEST). In place; cfg not frozen."""
    nodes = [(key, node) for key, node in _class_count_nodes(cfg) if node.NUM_CLASSES == 0]
    if not nodes:
        return
    for name in _names_in(cfg):
        classes = _dataset_classes(name)
        if classes:
            for key, node in nodes:
                node.NUM_CLASSES = len(classes)
                logger.info("%s = %d, the categories of dataset %s", key, len(classes), _describe(name))
            return
    raise ValueError(f"{nodes[0][0]} 0 takes the class count from the dataset, but no dataset of "
                     "DATASETS.TRAIN / TEST has known categories: set it to the number of classes")


def check_num_classes(cfg, names: Iterable[str]) -> None:
    """The student's class count (``class_count_key``: MODEL.ROI_HEADS.NUM_CLASSES, or
    MODEL.RETINANET.NUM_CLASSES for RetinaNet) must equal the number of categories of every
    dataset in ``names`` whose categories are known (a smaller count trains the extra categories
    as background; a larger one evaluates classes that do not exist)."""
    key = class_count_key(cfg)
    num = _get_key(cfg, key)
    teacher_key = "TEACHER." + key
    for name in names:
        classes = _dataset_classes(name)
        if classes is None or len(classes) == num:
            continue
        shown = classes if len(classes) <= 10 else classes[:10] + ["..."]
        raise ValueError(
            f"{key}={num}, but dataset {_describe(name)} has {len(classes)} categories "
            f"{shown}: set {key} {len(classes)} (and {teacher_key} "
            f"{len(classes)} for a teacher trained on them), or 0 to take it from the json"
        )
