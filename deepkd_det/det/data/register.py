"""Dataset registration from the config, with clear start-up errors for missing files.

detectron2 registers datasets lazily: a wrong path only fails deep inside the first data
loader, or when evaluation starts hours later. ``register_datasets_from_cfg`` registers the
``DATASETS.REGISTER`` entries and the embedded shapes set, then checks that every dataset named
in ``DATASETS.TRAIN`` / ``TEST`` is registered and that its json and image folder exist.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .config import add_data_config
from .synthetic import SHAPES_TRAIN, SHAPES_VAL, generate_shapes_dataset, shapes_split_paths

__all__ = [
    "check_dataset_paths",
    "prepare_shapes_dataset",
    "register_coco_dataset",
    "register_datasets_from_cfg",
]

logger = logging.getLogger(__name__)
# Names registered by this module: they may be re-registered (another path, a new test dir);
# names registered by anyone else (detectron2's builtin COCO, user code) are never replaced.
_OWN_NAMES: set = set()

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


def register_coco_dataset(name: str, json_file: str, image_root: str, *, check: bool = True) -> None:
    """Register a COCO instances json + image folder under ``name`` (detectron2's loader).

    With ``check`` the paths must exist now. Re-registering a name this function registered
    before replaces it; a name registered elsewhere (e.g. ``coco_2017_train``) is an error.
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
    register_coco_instances(name, {}, json_file, image_root)
    _OWN_NAMES.add(name)


def prepare_shapes_dataset(cfg) -> None:
    """Generate the shapes set described by cfg.DATASETS.SHAPES (main process; others wait) and
    register its two splits."""
    from detectron2.utils import comm

    s = cfg.DATASETS.SHAPES
    if comm.is_main_process():
        generate_shapes_dataset(s.ROOT, s.NUM_TRAIN, s.NUM_VAL, s.IMAGE_SIZE, s.SEED, s.MAX_OBJECTS)
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
