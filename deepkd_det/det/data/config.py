"""Config keys of the dataset side: COCO-format datasets of your own, and the embedded shapes set.

``add_data_config(cfg)`` adds (idempotently):

- ``DATASETS.REGISTER``: a list of ``[name, json_file, image_dir]`` entries, each registered as a
  COCO instances dataset at start-up (so ``name`` can go in ``DATASETS.TRAIN`` / ``TEST``), e.g.
  ``DATASETS.REGISTER: [["my_train", "data/train.json", "data/images"], ...]`` in a yaml, or
  ``DATASETS.REGISTER "[['my_train','data/train.json','data/images']]"`` on the command line.
- ``DATASETS.SHAPES``: where and how the embedded synthetic shapes set (names
  ``deepkd_shapes_train`` / ``deepkd_shapes_val``) is generated when a config uses it.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_data_config"]


def add_data_config(cfg: CN) -> CN:
    """Add DATASETS.REGISTER and DATASETS.SHAPES to ``cfg`` in place (no-op if present)."""
    if "REGISTER" not in cfg.DATASETS:
        # [[name, json_file, image_dir], ...]: COCO instances datasets registered at start-up.
        # Relative paths are taken from the working directory.
        cfg.DATASETS.REGISTER = []
    if "SHAPES" not in cfg.DATASETS:
        cfg.DATASETS.SHAPES = CN()
        # Folder the synthetic shapes set is written to (generated once, reused afterwards).
        cfg.DATASETS.SHAPES.ROOT = "datasets/deepkd_shapes"
        cfg.DATASETS.SHAPES.NUM_TRAIN = 200
        cfg.DATASETS.SHAPES.NUM_VAL = 50
        # Square images of this side, in pixels.
        cfg.DATASETS.SHAPES.IMAGE_SIZE = 128
        cfg.DATASETS.SHAPES.MAX_OBJECTS = 4
        # Shape classes drawn (1..6: circle, square, triangle, pentagon, hexagon, star); it must
        # equal MODEL.ROI_HEADS.NUM_CLASSES (checked at start-up), or that be 0 (taken from here).
        cfg.DATASETS.SHAPES.NUM_CLASSES = 3
        cfg.DATASETS.SHAPES.SEED = 0
    return cfg
