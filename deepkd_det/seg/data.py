"""Segmentation data: Cityscapes (official layout), your own image + label-PNG pairs, generated scenes.

Every dataset gives ``(image uint8 H x W x 3, label uint8/int64 H x W)`` pairs with class indices
``0..C-1`` and ``IGNORE_LABEL`` (255) for pixels that count nowhere (no loss, no mIoU).

- ``cityscapes``: ``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``<root>/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (what cityscapesscripts'
  ``createTrainIdLabelImgs`` writes, and what detectron2's ``cityscapes_fine_sem_seg_*`` reads);
  where only ``*_gtFine_labelIds.png`` exists its ids are mapped to the 19 train ids by the
  official table (``CITYSCAPES_ID_TO_TRAINID``; every other id is 255).
- ``folder`` (your own data): ``<root>/<split>/images/<name>.{png,jpg,jpeg}`` and
  ``<root>/<split>/labels/<name>.png`` (pixel value = class index, 255 = ignore), the class names
  in ``DATASET.CLASSES`` or ``<root>/classes.txt`` (one name a line).
- ``synthetic`` (the default, for the demo and the tests): generated scenes of circles, squares
  and triangles on textured backgrounds, each class's colours scattered around its own base
  colour (``COLOUR_JITTER``; overlapping, so colour is a cue and shape settles the rest; -1: any
  colour); classes background + shapes, a 1-pixel ignore
  band (255) along every object's outline, as in PASCAL VOC's labels. Deterministic from
  ``(DATASET.SYNTHETIC.SEED, split, index)``; a student's ``TRAIN_IMAGES`` smaller than the
  teacher's is the first images of the same stream.

Start-up checks (one-line errors naming the file): missing folders and files, an image and its
label of different sizes, label values outside the class list (``DATASET.CHECK_VALUES``: every
label read once at start-up; each label is checked again when it is loaded).
"""

from __future__ import annotations

import glob
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAINID", "DatasetError", "FileSegDataset", "SHAPE_NAMES",
           "SegTrainSet", "SyntheticScenes", "build_seg_datasets", "check_label_values", "collate",
           "eval_tensors", "iteration_batches", "train_sample"]

IGNORE_LABEL = 255

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# The official labels table (cityscapesscripts/helpers/labels.py): id -> trainId of the 19
# evaluated classes; every other id (void, license plate, caravan, trailer, ...) is ignored.
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SHAPE_NAMES = ("circle", "square", "triangle", "pentagon", "hexagon", "star")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset that cannot be used as given (missing file, size mismatch, label out of range)."""


def _trainid_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for k, v in CITYSCAPES_ID_TO_TRAINID.items():
        lut[k] = v
    return lut


def check_label_values(label: np.ndarray, num_classes: int, where: str) -> None:
    """DatasetError naming ``where`` if a pixel is neither a class index ``< num_classes`` nor 255."""
    bad = (label >= num_classes) & (label != IGNORE_LABEL)
    if bad.any():
        values = sorted(set(np.unique(label[bad]).tolist()))
        raise DatasetError(f"{where}: label values {values[:8]} are outside the class list (0..{num_classes - 1}, "
                           f"{IGNORE_LABEL} = ignore; {num_classes} classes)")


class FileSegDataset:
    """Image / label-PNG pairs from disk (Cityscapes or a folder), checked at construction."""

    def __init__(self, pairs: Sequence[Tuple[str, str]], classes: Sequence[str], label_map: Optional[np.ndarray] = None,
                 check_values: bool = True):
        self.pairs, self.classes, self.label_map = list(pairs), tuple(classes), label_map
        self.num_classes = len(self.classes)
        for img, lab in self.pairs:
            for path in (img, lab):
                if not os.path.isfile(path):
                    raise DatasetError(f"missing file: {path}")
            with Image.open(img) as a, Image.open(lab) as b:
                if a.size != b.size:
                    raise DatasetError(f"{lab}: label is {b.size[0]}x{b.size[1]} but its image {img} is "
                                       f"{a.size[0]}x{a.size[1]} (W x H)")
        if check_values:
            for i in range(len(self.pairs)):
                self.label(i)

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, i: int) -> np.ndarray:
        path = self.pairs[i][1]
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"{path}: a label PNG must be single-channel (mode L or P), got mode {im.mode}")
            lab = np.asarray(im).astype(np.int64)
        if self.label_map is not None:
            if lab.max() > 255 or lab.min() < 0:
                raise DatasetError(f"{path}: label ids must lie in 0..255")
            lab = self.label_map[lab]
        check_label_values(lab, self.num_classes, path)
        return lab.astype(np.uint8)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        with Image.open(self.pairs[i][0]) as im:
            image = np.asarray(im.convert("RGB"))
        return image, self.label(i)


def cityscapes_pairs(root: str, split: str) -> Tuple[List[Tuple[str, str]], Optional[np.ndarray]]:
    img_dir = os.path.join(root, "leftImg8bit", split)
    gt_dir = os.path.join(root, "gtFine", split)
    for d in (img_dir, gt_dir):
        if not os.path.isdir(d):
            raise DatasetError(f"Cityscapes folder not found: {d} (expected <root>/leftImg8bit/<split>/<city>/ and "
                               "<root>/gtFine/<split>/<city>/)")
    images = sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
    if not images:
        raise DatasetError(f"no *_leftImg8bit.png images under {img_dir}/<city>/")
    # Train ids (createTrainIdLabelImgs) where the first image has them, else the raw ids, mapped.
    def gt(img, kind):
        city = os.path.basename(os.path.dirname(img))
        stem = os.path.basename(img)[: -len("_leftImg8bit.png")]
        return os.path.join(gt_dir, city, f"{stem}_gtFine_{kind}.png")

    use_ids = not os.path.isfile(gt(images[0], "labelTrainIds"))
    kind = "labelIds" if use_ids else "labelTrainIds"
    pairs = [(img, gt(img, kind)) for img in images]
    for img, lab in pairs:
        if not os.path.isfile(lab):
            raise DatasetError(f"missing label for {img}: {lab}")
    return pairs, (_trainid_lut() if use_ids else None)


def folder_pairs(root: str, split: str) -> List[Tuple[str, str]]:
    img_dir, lab_dir = os.path.join(root, split, "images"), os.path.join(root, split, "labels")
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise DatasetError(f"folder not found: {d} (expected <root>/<split>/images/ and <root>/<split>/labels/)")
    images = sorted(p for p in glob.glob(os.path.join(img_dir, "*")) if p.lower().endswith(_IMAGE_EXTS))
    if not images:
        raise DatasetError(f"no images ({', '.join(_IMAGE_EXTS)}) in {img_dir}")
    return [(p, os.path.join(lab_dir, os.path.splitext(os.path.basename(p))[0] + ".png")) for p in images]


def folder_classes(root: str, classes: Sequence[str]) -> Tuple[str, ...]:
    if classes:
        return tuple(classes)
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        raise DatasetError(f"no class list: set DATASET.CLASSES or write {path} (one class name a line)")
    with open(path) as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise DatasetError(f"{path} lists no class")
    if len(names) > 255:
        raise DatasetError(f"{path}: at most 255 classes (255 is the ignore label), got {len(names)}")
    return names


class SyntheticScenes:
    """Generated scenes with per-pixel labels (module docstring); images are made on first use."""

    def __init__(self, num_images: int, size: int = 64, num_shapes: int = 3, seed: int = 0, split: str = "train",
                 max_objects: int = 4, colour_jitter: float = 70):
        if not 1 <= num_shapes <= len(SHAPE_NAMES):
            raise DatasetError(f"DATASET.SYNTHETIC.NUM_SHAPES must lie in 1..{len(SHAPE_NAMES)}, got {num_shapes}")
        self.n, self.size, self.seed, self.max_objects = int(num_images), int(size), int(seed), int(max_objects)
        self.colour_jitter = float(colour_jitter)
        self.split_id = {"train": 1, "val": 2}[split]
        self.classes = ("background",) + SHAPE_NAMES[:num_shapes]
        self.num_classes = len(self.classes)
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            self._cache[i] = render_scene(np.random.default_rng([self.seed, self.split_id, int(i)]), self.size,
                                          self.num_classes - 1, self.max_objects, self.colour_jitter)
        return self._cache[i]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if kind == "star":
        return [(cx + rr * math.cos(angle + math.pi * i / 5), cy + rr * math.sin(angle + math.pi * i / 5))
                for i, rr in zip(range(10), [r, 0.45 * r] * 5)]
    n = {"circle": 32, "square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[kind]
    return [(cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
            for i in range(n)]


# Each shape class's base colour (``colour_jitter`` >= 0): the shapes' colours overlap between
# classes, so colour is a cue a small network picks up quickly and shape settles the rest.
_CLASS_COLOURS = np.array([(220, 60, 50), (60, 110, 220), (230, 200, 50), (150, 70, 200), (60, 190, 110),
                           (240, 130, 190)], dtype=np.float64)


def render_scene(rng: np.random.Generator, size: int, num_shapes: int, max_objects: int, colour_jitter: float = 70):
    """One scene: textured background (two gratings + noise), 1..max_objects shapes (later ones on
    top), the label map with a 1-pixel ignore band on every outline. A shape's colour is its
    class's base colour +- ``colour_jitter`` per channel, or any colour for ``colour_jitter < 0``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.broadcast_to(rng.uniform(40, 215, size=3), (size, size, 3)).copy()
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(2, 9), rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        img += wave[..., None] * rng.uniform(8, 28, size=3)
    img += rng.normal(0, 8, size=img.shape)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    label = Image.new("L", (size, size), 0)
    draw, ldraw = ImageDraw.Draw(canvas), ImageDraw.Draw(label)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(1, num_shapes + 1))
        r = rng.uniform(0.1, 0.25) * size
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
        poly = _polygon(SHAPE_NAMES[cls - 1], cx, cy, r, rng.uniform(0, 2 * math.pi))
        if colour_jitter < 0:
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        else:
            jitter = rng.uniform(-colour_jitter, colour_jitter, size=3)
            colour = tuple(int(c) for c in np.clip(_CLASS_COLOURS[cls - 1] + jitter, 0, 255))
        draw.polygon(poly, fill=colour)
        ldraw.polygon(poly, fill=cls, outline=IGNORE_LABEL)
    return np.asarray(canvas), np.asarray(label)


def build_seg_datasets(cfg) -> Tuple[object, object, Tuple[str, ...]]:
    """``(train, val, class names)`` of ``cfg.DATASET``."""
    d = cfg.DATASET
    if d.TYPE == "synthetic":
        s = d.SYNTHETIC
        train = SyntheticScenes(s.TRAIN_IMAGES, s.SIZE, s.NUM_SHAPES, s.SEED, "train", s.MAX_OBJECTS, s.COLOUR_JITTER)
        val = SyntheticScenes(s.VAL_IMAGES, s.SIZE, s.NUM_SHAPES, s.SEED, "val", s.MAX_OBJECTS, s.COLOUR_JITTER)
        return train, val, train.classes
    if not d.ROOT:
        raise DatasetError(f"DATASET.ROOT must name the {d.TYPE} folder")
    if not os.path.isdir(d.ROOT):
        raise DatasetError(f"DATASET.ROOT not found: {d.ROOT}")
    if d.TYPE == "cityscapes":
        sets = []
        for split in (d.TRAIN_SPLIT, d.VAL_SPLIT):
            pairs, lut = cityscapes_pairs(d.ROOT, split)
            sets.append(FileSegDataset(pairs, CITYSCAPES_CLASSES, lut, d.CHECK_VALUES))
        return sets[0], sets[1], CITYSCAPES_CLASSES
    classes = folder_classes(d.ROOT, d.CLASSES)
    train = FileSegDataset(folder_pairs(d.ROOT, d.TRAIN_SPLIT), classes, None, d.CHECK_VALUES)
    val = FileSegDataset(folder_pairs(d.ROOT, d.VAL_SPLIT), classes, None, d.CHECK_VALUES)
    return train, val, classes


# ------------------------------------------------------------------------------ transforms


def _to_tensors(image: np.ndarray, label: np.ndarray, mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, torch.from_numpy(np.array(label, dtype=np.int64))


def train_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, scale_range, crop, flip: bool,
                 mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random scale in ``scale_range`` (image bilinear, label nearest), random crop ``crop`` (H, W;
    padded with 0 / 255 where the scaled image is smaller), random horizontal flip; normalised."""
    x, y = _to_tensors(image, label, mean, std)
    s = float(rng.uniform(scale_range[0], scale_range[1]))
    h, w = y.shape
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        y = F.interpolate(y[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    ch, cw = int(crop[0]), int(crop[1])
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    if ph or pw:  # pad bottom / right: image with 0 (the mean after normalisation), label with ignore
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE_LABEL)
    top = int(rng.integers(0, y.shape[0] - ch + 1))
    left = int(rng.integers(0, y.shape[1] - cw + 1))
    x, y = x[:, top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]
    if flip and rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


def eval_tensors(image: np.ndarray, label: np.ndarray, mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """A validation pair at full size, normalised."""
    return _to_tensors(image, label, mean, std)


class SegTrainSet(torch.utils.data.Dataset):
    """Training samples addressed by ``(index, augmentation seed)``: the augmentation of a sample
    depends only on that seed, so a resumed run draws exactly the crops of an uninterrupted one
    (whichever worker process loads it)."""

    def __init__(self, base, *, scale_range, crop, flip, mean, std):
        self.base, self.kw = base, dict(scale_range=scale_range, crop=crop, flip=flip, mean=mean, std=std)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        image, label = self.base[index]
        return train_sample(image, label, np.random.default_rng(seed), **self.kw)


def iteration_batches(n: int, batch: int, seed: int, start_iter: int, max_iter: int):
    """Batches of ``(index, aug seed)`` for iterations ``start_iter..max_iter-1``: the sample stream is
    epoch after epoch of permutations seeded by ``(seed, epoch)``; the same iteration always gets the
    same batch."""
    perms: Dict[int, np.ndarray] = {}
    for it in range(start_iter, max_iter):
        keys = []
        for b in range(batch):
            p = it * batch + b
            epoch, pos = divmod(p, n)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = np.random.default_rng([seed, 7, epoch]).permutation(n)
            keys.append((int(perms[epoch][pos]), (seed, it, b)))
        yield keys


def collate(samples):
    images, labels = zip(*samples)
    return torch.stack(images), torch.stack(labels)
