"""The embedded default dataset: coloured shapes on textured backgrounds, in COCO format.

No dataset can be downloaded where this project is built and tested, so the demo and the tests
use this small, deterministic detection set: circles, squares and triangles (three classes,
category ids 1..3; ``num_classes`` up to 6 adds pentagons, hexagons and stars, so that some
classes look alike at small sizes) of random colour, size and position, several per image, on
backgrounds made of gratings and noise. Each split is a folder of PNG (or JPEG) images plus a COCO instances json
with ``bbox`` (tight, XYWH, of the drawn pixels), ``iscrowd`` 0, a polygon ``segmentation``
(``[[x1, y1, x2, y2, ...], ...]``: the exact outline of the drawn pixels, ``mask_outlines``) and
``area`` (the pixel count, which is the polygons' area), so the same files serve Mask R-CNN
(``MODEL.MASK_ON``) and COCO's ``segm`` evaluation. The same (seed, sizes) always gives the same
files.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from deepkd_det.core.io import atomic_write_json

__all__ = [
    "ALL_SHAPE_CATEGORIES",
    "SHAPE_CATEGORIES",
    "SHAPES_TRAIN",
    "SHAPES_VAL",
    "generate_shapes_dataset",
    "mask_outlines",
    "polygon_area",
    "render_shapes_image",
    "shapes_split_paths",
]

# Every shape the generator draws, in category-id order; a set of ``num_classes`` uses the first ones.
ALL_SHAPE_CATEGORIES: List[Dict] = [
    {"id": i + 1, "name": name, "supercategory": "shape"}
    for i, name in enumerate(("circle", "square", "triangle", "pentagon", "hexagon", "star"))
]
# The default set (three classes).
SHAPE_CATEGORIES: List[Dict] = ALL_SHAPE_CATEGORIES[:3]
# Dataset names under which deepkd_det.det.data.register registers the two splits.
SHAPES_TRAIN = "deepkd_shapes_train"
SHAPES_VAL = "deepkd_shapes_val"
_SPLIT_IDS = {"train": 1, "val": 2}


def shapes_split_paths(root: str, split: str) -> Tuple[str, str]:
    """``(json_file, image_dir)`` of a split ("train" or "val") under ``root``."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured RGB background: a base colour, two oriented gratings and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 215, size=3)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(2):
        theta = rng.uniform(0, math.pi)
        freq = rng.uniform(2, 9)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        img += wave[..., None] * rng.uniform(8, 28, size=3)
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255)


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` (a 24-gon stands for the circle's outline; the
    star's inner vertices lie at 0.45 r)."""
    if kind == "star":
        return [
            (cx + rr * math.cos(angle + math.pi * i / 5), cy + rr * math.sin(angle + math.pi * i / 5))
            for i, rr in zip(range(10), [r, 0.45 * r] * 5)
        ]
    n = {"circle": 24, "square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[kind]
    if kind == "circle":
        angle = 0.0
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def mask_outlines(mask: np.ndarray) -> List[List[int]]:
    """The outline of the pixels of ``mask`` as COCO polygons ``[[x1, y1, x2, y2, ...], ...]``,
    exactly: vertices on pixel corners (pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``, the
    convention of COCO's boxes, pycocotools and detectron2), one polygon per piece, runs of
    collinear pixel sides merged. Rasterised by pycocotools the polygons give ``mask`` back and
    their areas add up to its pixel count. The boundary is followed along pixel sides, clockwise
    on screen; where two pixels touch only at a corner the pieces are kept apart. A mask with a
    hole is refused (a polygon cannot hold one; the shapes never have holes)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("an empty mask has no outline")
    x0, y0 = int(xs.min()), int(ys.min())
    sub = np.pad(mask[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1], 1)
    # Directed sides with the object on their right (screen coordinates, y down), start -> ends.
    nxt: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for y, x in zip(*np.nonzero(sub)):
        x, y = int(x), int(y)
        if not sub[y - 1, x]:
            nxt.setdefault((x, y), []).append((x + 1, y))
        if not sub[y, x + 1]:
            nxt.setdefault((x + 1, y), []).append((x + 1, y + 1))
        if not sub[y + 1, x]:
            nxt.setdefault((x + 1, y + 1), []).append((x, y + 1))
        if not sub[y, x - 1]:
            nxt.setdefault((x, y + 1), []).append((x, y))
    polygons = []
    while nxt:
        start = min(nxt)  # top-left corner of a piece: its outline, not a hole's
        path = [start]
        point = start
        heading = None
        while True:
            ends = nxt[point]
            if len(ends) > 1 and heading is not None:
                # Two pixels meet at this corner only: turn right, around the pixel being followed.
                right = (-heading[1], heading[0])
                end = next(e for e in ends if (e[0] - point[0], e[1] - point[1]) == right)
            else:
                end = ends[0]
            ends.remove(end)
            if not ends:
                del nxt[point]
            heading = (end[0] - point[0], end[1] - point[1])
            point = end
            if point == start:
                break
            path.append(point)
        # Keep the corners only (a vertex where the direction changes).
        corners = [
            p for i, p in enumerate(path)
            if (p[0] - path[i - 1][0], p[1] - path[i - 1][1])
            != (path[(i + 1) % len(path)][0] - p[0], path[(i + 1) % len(path)][1] - p[1])
        ]
        flat = [c for p in corners for c in (p[0] - 1 + x0, p[1] - 1 + y0)]
        xs_, ys_ = np.asarray(flat[0::2], dtype=np.float64), np.asarray(flat[1::2], dtype=np.float64)
        if np.dot(xs_, np.roll(ys_, -1)) - np.dot(ys_, np.roll(xs_, -1)) < 0:
            raise ValueError("the mask has a hole, which a COCO polygon cannot describe")
        polygons.append(flat)
    return polygons


def polygon_area(flat: List[float]) -> float:
    """Area of a simple polygon ``[x1, y1, x2, y2, ...]`` (shoelace formula; detectron2's
    ``PolygonMasks.area`` and the ``area`` detectron2 writes into a COCO json)."""
    xs, ys = np.asarray(flat[0::2], dtype=np.float64), np.asarray(flat[1::2], dtype=np.float64)
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> Tuple[int, int, int]:
    """A random colour far enough from the background that the shape is visible."""
    for _ in range(50):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background_mean).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def render_shapes_image(
    rng: np.random.Generator, size: int, max_objects: int = 4, num_classes: int = 3, return_masks: bool = False
):
    """One image and its objects: ``[{"category_id", "bbox", "area", "segmentation"}, ...]``, the
    classes drawn from the first ``num_classes`` of ``ALL_SHAPE_CATEGORIES``.

    Objects never overlap (their boxes keep a 2 px gap), so every box is tight and unoccluded.
    ``return_masks``: also the drawn pixels of each object (boolean ``size x size`` arrays), as a
    third item; the image and objects are the same either way.
    """
    img = _background(rng, size)
    canvas = Image.fromarray(img.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    num_objects = int(rng.integers(1, max_objects + 1))
    placed: List[Tuple[float, float, float, float]] = []
    objects: List[Dict] = []
    masks: List[np.ndarray] = []
    for _ in range(num_objects):
        for _attempt in range(30):
            cat = ALL_SHAPE_CATEGORIES[int(rng.integers(0, num_classes))]
            r = rng.uniform(0.08, 0.2) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            poly = _shape_polygon(cat["name"], cx, cy, r, angle)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            box = (min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in placed):
                break
        else:
            break  # the image is full; keep the objects placed so far
        placed.append(box)
        mask_img = Image.new("L", (size, size), 0)
        mask_draw = ImageDraw.Draw(mask_img)
        x0, y0 = box[0] + 2, box[1] + 2
        region = np.asarray(img[int(max(y0, 0)) : int(box[3]), int(max(x0, 0)) : int(box[2])])
        colour = _object_colour(rng, region.reshape(-1, 3).mean(axis=0))
        if cat["name"] == "circle":
            ellipse = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(ellipse, fill=colour)
            mask_draw.ellipse(ellipse, fill=1)
        else:
            draw.polygon(poly, fill=colour)
            mask_draw.polygon(poly, fill=1)
        mask = np.asarray(mask_img, dtype=bool)
        masks.append(mask)
        ys_idx, xs_idx = np.nonzero(mask)
        bx0, by0 = int(xs_idx.min()), int(ys_idx.min())
        bw, bh = int(xs_idx.max()) + 1 - bx0, int(ys_idx.max()) + 1 - by0
        outlines = mask_outlines(mask)
        objects.append(
            {
                "category_id": cat["id"],
                "bbox": [bx0, by0, bw, bh],
                # The pixel count: the polygons trace the pixels exactly (COCO's "area").
                "area": int(round(sum(polygon_area(p) for p in outlines))),
                "segmentation": outlines,
            }
        )
    if return_masks:
        return canvas, objects, masks
    return canvas, objects


def _params(num_images: int, image_size: int, seed: int, max_objects: int, image_format: str,
            num_classes: int) -> Dict:
    return {
        "num_classes": int(num_classes),
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "max_objects": int(max_objects),
        "image_format": image_format,
        # v2: "segmentation" traces the drawn pixels exactly (v1: the outline the shape was drawn
        # from, which misses PIL's boundary pixels). Images, boxes and areas are those of v1: a v1
        # split is rewritten with the same images.
        "generator": "deepkd_det.det.data.synthetic v2",
    }


def _split_is_current(json_file: str, params: Dict) -> bool:
    if not os.path.isfile(json_file):
        return False
    try:
        with open(json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError):
        return False
    return info.get("deepkd_params") == params


def _generate_split(root: str, split: str, num_images: int, image_size: int, seed: int,
                    max_objects: int, image_format: str, num_classes: int) -> str:
    json_file, image_dir = shapes_split_paths(root, split)
    params = _params(num_images, image_size, seed, max_objects, image_format, num_classes)
    if _split_is_current(json_file, params):
        return json_file
    os.makedirs(image_dir, exist_ok=True)
    ext = "png" if image_format == "png" else "jpg"
    images, annotations = [], []
    for index in range(num_images):
        # One generator per image: an image does not depend on how many came before it.
        rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], index])
        canvas, objects = render_shapes_image(rng, image_size, max_objects, num_classes)
        file_name = f"{split}_{index:06d}.{ext}"
        if ext == "png":
            canvas.save(os.path.join(image_dir, file_name), format="PNG")
        else:
            canvas.save(os.path.join(image_dir, file_name), format="JPEG", quality=95)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    data = {
        "info": {"description": f"DeepKD-Det synthetic shapes, {split} split", "deepkd_params": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": ALL_SHAPE_CATEGORIES[:num_classes],
    }
    # The json is written last and atomically: it marks the split as complete.
    atomic_write_json(json_file, data)
    return json_file


def generate_shapes_dataset(
    root: str,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int = 128,
    seed: int = 0,
    max_objects: int = 4,
    image_format: str = "png",
    num_classes: int = 3,
) -> Dict[str, Tuple[str, str]]:
    """Write (or reuse, when already generated with the same settings) the two splits.

    Returns ``{"train": (json_file, image_dir), "val": (json_file, image_dir)}``. The files are
    a pure function of the arguments. ``image_format`` is "png" (lossless) or "jpg";
    ``num_classes`` (1 to 6) how many of ``ALL_SHAPE_CATEGORIES`` are drawn.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one image per split, got num_train={num_train}, num_val={num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if not 1 <= num_classes <= len(ALL_SHAPE_CATEGORIES):
        raise ValueError(f"num_classes must lie in 1..{len(ALL_SHAPE_CATEGORIES)}, got {num_classes}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = {}
    for split, n in (("train", num_train), ("val", num_val)):
        _generate_split(root, split, n, image_size, seed, max_objects, image_format, num_classes)
        out[split] = shapes_split_paths(root, split)
    return out
