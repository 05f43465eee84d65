"""Datasets: COCO-format datasets from the config, the embedded synthetic shapes set."""

from .config import add_data_config
from .register import (
    BOX_TOLERANCE,
    check_dataset_paths,
    check_num_classes,
    check_training_annotations,
    image_problem,
    inspect_coco_json,
    prepare_shapes_dataset,
    register_coco_dataset,
    register_datasets_from_cfg,
    resolve_num_classes,
)
from .synthetic import (
    ALL_SHAPE_CATEGORIES,
    SHAPE_CATEGORIES,
    SHAPES_TRAIN,
    SHAPES_VAL,
    generate_shapes_dataset,
    render_shapes_image,
    shapes_split_paths,
)

__all__ = [
    "BOX_TOLERANCE",
    "check_num_classes",
    "check_training_annotations",
    "image_problem",
    "inspect_coco_json",
    "resolve_num_classes",
    "ALL_SHAPE_CATEGORIES",
    "SHAPE_CATEGORIES",
    "SHAPES_TRAIN",
    "SHAPES_VAL",
    "add_data_config",
    "check_dataset_paths",
    "generate_shapes_dataset",
    "prepare_shapes_dataset",
    "register_coco_dataset",
    "register_datasets_from_cfg",
    "render_shapes_image",
    "shapes_split_paths",
]
