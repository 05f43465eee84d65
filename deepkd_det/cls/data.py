"""Classification datasets and loaders: CIFAR-100, ImageNet (class folders), embedded digits.

``build_datasets(cfg)`` returns ``(train_set, val_set, num_classes)``; ``build_loaders`` wraps
them for one worker of a (possibly distributed) run. The training order of an epoch depends
only on ``(SEED, epoch)``, so a resumed run sees the same batches as an uninterrupted one.

Two-view methods (MLKD, CRLD) train on a weak and a strong augmentation of each image:
``build_datasets(cfg, two_views=True)`` makes every training item ``((weak, strong), label)``
(:class:`TwoViews`), so a batch is ``([weak_batch, strong_batch], labels)``. The weak view is
the usual crop and flip; the strong view adds AutoAugment or RandAugment
(``DATASET.STRONG_AUG``). The validation set is never wrapped: top-1 is measured as before.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from .config import dataset_root

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetMissingError",
    "DigitsDataset",
    "ShardSampler",
    "TwoViews",
    "build_cifar100",
    "build_datasets",
    "build_digits",
    "build_imagenet",
    "build_loaders",
    "epoch_generator",
    "strong_augment",
]

# Per-channel statistics of the CIFAR-100 training images and of ImageNet (published values).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not where the configuration says."""


# --------------------------------------------------------------------------- two views
class TwoViews:
    """Transform returning ``(weak(img), strong(img))``: two independent augmentations of one image."""

    def __init__(self, weak, strong):
        self.weak = weak
        self.strong = strong

    def __call__(self, img):
        return self.weak(img), self.strong(img)

    def __repr__(self) -> str:
        return f"TwoViews(weak={self.weak!r}, strong={self.strong!r})"


def strong_augment(name: str, policy: str = "cifar10"):
    """torchvision's AutoAugment (``policy`` cifar10 or imagenet) or RandAugment (2 ops, magnitude 9).

    Works on PIL images and on uint8 tensors.
    """
    import torchvision.transforms as T

    if name == "autoaugment":
        policies = {"cifar10": T.AutoAugmentPolicy.CIFAR10, "imagenet": T.AutoAugmentPolicy.IMAGENET}
        if policy not in policies:
            raise ValueError(f"AutoAugment policy must be one of {sorted(policies)}, got {policy!r}")
        return T.AutoAugment(policies[policy])
    if name == "randaugment":
        return T.RandAugment()
    raise ValueError(f"DATASET.STRONG_AUG must be 'autoaugment' or 'randaugment', got {name!r}")


# --------------------------------------------------------------------------- CIFAR-100
def _cifar100_class():
    from torchvision.datasets import CIFAR100

    class CIFAR100Files(CIFAR100):
        """torchvision's CIFAR-100 reader, checking that the files exist instead of their md5.

        Hashing 160 MB on every start is slow, and the tests write small files in the same
        format. A corrupt file still fails when it is unpickled; a download is still checked
        against the archive's md5.
        """

        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    return CIFAR100Files


def build_cifar100(root: str, download: bool = False, strong_aug: Optional[str] = None
                   ) -> Tuple[Dataset, Dataset, int]:
    """CIFAR-100 from ``<root>/cifar-100-python/{train,test,meta}`` (the python-pickle release).

    ``strong_aug`` (autoaugment/randaugment): training items are two views (:class:`TwoViews`).
    """
    import torchvision.transforms as T

    cls = _cifar100_class()
    folder = os.path.join(root, cls.base_folder)
    if not download and not os.path.isdir(folder):
        raise DatasetMissingError(
            f"CIFAR-100 not found: expected the directory {os.path.abspath(folder)!r} "
            f"(cifar-100-python with train, test, meta), i.e. the extracted cifar-100-python.tar.gz. "
            f"Set DATASET.ROOT to the directory that contains cifar-100-python, or DATASET.DOWNLOAD True "
            f"on a machine with network access."
        )
    normalize = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
    weak_ops = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    train_tf = T.Compose(weak_ops + [T.ToTensor(), normalize])
    if strong_aug:
        strong_tf = T.Compose(weak_ops + [strong_augment(strong_aug, "cifar10"), T.ToTensor(), normalize])
        train_tf = TwoViews(train_tf, strong_tf)
    val_tf = T.Compose([T.ToTensor(), normalize])
    try:
        train = cls(root, train=True, transform=train_tf, download=download)
        val = cls(root, train=False, transform=val_tf, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DatasetMissingError(f"CIFAR-100 under {os.path.abspath(folder)!r} is incomplete: {exc}") from None
    except OSError as exc:  # DOWNLOAD True without network access
        raise DatasetMissingError(f"CIFAR-100 download into {os.path.abspath(root)!r} failed: {exc}") from None
    return train, val, len(train.classes)


# --------------------------------------------------------------------------- ImageNet
def build_imagenet(root: str, strong_aug: Optional[str] = None) -> Tuple[Dataset, Dataset, int]:
    """ImageNet (or any class-folder set) from ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

    ``strong_aug`` (autoaugment/randaugment): training items are two views (:class:`TwoViews`).
    """
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    dirs = {split: os.path.join(root, split) for split in ("train", "val")}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        raise DatasetMissingError(
            f"ImageNet not found: expected class folders under {[os.path.abspath(d) for d in missing]} "
            f"(layout <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG). Set DATASET.ROOT."
        )
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    weak_ops = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    train_tf = T.Compose(weak_ops + [T.ToTensor(), normalize])
    if strong_aug:
        strong_tf = T.Compose(weak_ops + [strong_augment(strong_aug, "imagenet"), T.ToTensor(), normalize])
        train_tf = TwoViews(train_tf, strong_tf)
    val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train = ImageFolder(dirs["train"], transform=train_tf)
    val = ImageFolder(dirs["val"], transform=val_tf)
    if train.class_to_idx != val.class_to_idx:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DatasetMissingError(
            f"ImageNet train/ and val/ hold different class folders ({len(train.classes)} vs "
            f"{len(val.classes)}; only in train: {only_train}, only in val: {only_val})"
        )
    return train, val, len(train.classes)


# --------------------------------------------------------------------------- digits
class DigitsDataset(Dataset):
    """In-memory image tensors with an optional random crop (zero padding), for the digits set.

    The images are normalised, ``(x - mean) / std`` with ``x`` in [0, 1]. With ``strong_aug``
    (a transform of uint8 image tensors, e.g. :func:`strong_augment`) an item is
    ``((weak, strong), label)``: the strong view is the image in uint8, augmented, normalised
    again and then shifted like the weak one.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop_padding: int = 0,
                 strong_aug=None, mean: float = 0.0, std: float = 1.0):
        self.images = images
        self.labels = labels
        self.crop_padding = crop_padding
        self.strong_aug = strong_aug
        self.mean, self.std = float(mean), float(std)
        self.classes = [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def _shift(self, img: torch.Tensor) -> torch.Tensor:
        pad = self.crop_padding
        if pad:
            h, w = img.shape[-2:]
            img = F.pad(img, (pad, pad, pad, pad))
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            img = img[:, dy:dy + h, dx:dx + w]
        return img

    def _strong(self, img: torch.Tensor) -> torch.Tensor:
        # AutoAugment's colour ops (posterize, equalize, solarize) need uint8 pixels.
        pixels = ((img * self.std + self.mean).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        out = self.strong_aug(pixels).float() / 255.0
        return self._shift((out - self.mean) / self.std)

    def __getitem__(self, i: int):
        img, label = self.images[i], int(self.labels[i])
        weak = self._shift(img)
        if self.strong_aug is None:
            return weak, label
        return (weak, self._strong(img)), label


def build_digits(size: int = 16, val_fraction: float = 0.3, split_seed: int = 0,
                 train_limit: int = 0, strong_aug: Optional[str] = None,
                 train_per_class: int = 0) -> Tuple[Dataset, Dataset, int]:
    """scikit-learn's 8x8 handwritten digits (1797 real images, 10 classes), upsampled to size x size.

    The split is stratified and depends only on ``split_seed``; normalisation uses the mean and
    std of the training images. ``train_per_class`` keeps the first that many training images of
    each class (a labelled subset for a student whose teacher saw the whole split): the
    normalisation then stays that of the whole training split, so teacher and student see
    identical inputs. Training images get a random shift (crop with padding) but no
    flip: digits are not mirror-symmetric. ``strong_aug`` (autoaugment/randaugment, CIFAR10
    policy: the images are small): training items are two views.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # values 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.RandomState(split_seed)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    train_idx = rng.permutation(train_idx)
    stats_idx = train_idx
    if train_per_class:
        per_class = [[i for i in train_idx if digits.target[i] == c][:train_per_class] for c in range(10)]
        keep = set(sum(per_class, []))
        train_idx = np.asarray([i for i in train_idx if i in keep])
    if train_limit:
        train_idx = train_idx[:train_limit]
        stats_idx = train_idx
    images = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1)
    train_images = images[torch.as_tensor(stats_idx)]
    mean, std = train_images.mean(), train_images.std()
    images = ((images - mean) / std).contiguous()
    train = DigitsDataset(images[torch.as_tensor(train_idx)].clone(), labels[torch.as_tensor(train_idx)],
                          crop_padding=max(1, size // 8),
                          strong_aug=strong_augment(strong_aug, "cifar10") if strong_aug else None,
                          mean=float(mean), std=float(std))
    val = DigitsDataset(images[torch.as_tensor(sorted(val_idx))].clone(), labels[torch.as_tensor(sorted(val_idx))])
    return train, val, 10


def build_datasets(cfg, two_views: bool = False) -> Tuple[Dataset, Dataset, int]:
    """``(train_set, val_set, num_classes)`` for ``cfg.DATASET``.

    ``two_views``: training items are ``((weak, strong), label)`` with the strong view from
    ``DATASET.STRONG_AUG`` (the trainer asks for this when the distiller's ``needs_two_views``).
    """
    kind = cfg.DATASET.TYPE
    strong = cfg.DATASET.STRONG_AUG if two_views else None
    if kind == "digits":
        d = cfg.DATASET.DIGITS
        return build_digits(d.SIZE, d.VAL_FRACTION, d.SPLIT_SEED, d.TRAIN_LIMIT, strong_aug=strong,
                            train_per_class=d.TRAIN_PER_CLASS)
    root = dataset_root(cfg)
    if kind == "cifar100":
        return build_cifar100(root, download=cfg.DATASET.DOWNLOAD, strong_aug=strong)
    if kind == "imagenet":
        return build_imagenet(root, strong_aug=strong)
    raise ValueError(f"unknown DATASET.TYPE {kind!r}")


# --------------------------------------------------------------------------- loaders
class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: disjoint shards covering the set once, no padding.

    Evaluation sums correct counts over the shards, so the accuracy is exact for any world size
    (DistributedSampler would repeat samples to even out the shards).
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator that decides an epoch's shuffle (single worker) and loader-worker seeds.

    Under torch.distributed the shuffle is DistributedSampler's (seed, epoch); the rank enters
    here so that the ranks' augmentation streams differ.
    """
    return torch.Generator().manual_seed((int(seed) * 100_003 + int(epoch)) * 1_009 + int(rank))


class EpochLoader:
    """A training loader whose order is a pure function of ``(seed, epoch)``.

    ``loader(epoch)`` builds the epoch's DataLoader; under torch.distributed each rank reads its
    DistributedSampler shard (drop_last, so every rank runs the same number of steps).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int,
                 rank: int = 0, world: int = 1, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.rank, self.world = rank, world
        self.pin_memory = pin_memory
        per_rank = len(dataset) // world
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set ({len(dataset)} images over {world} worker(s)) is smaller than one "
                f"batch of {batch_size} per worker"
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __call__(self, epoch: int) -> DataLoader:
        gen = epoch_generator(self.seed, epoch, self.rank)
        if self.world > 1:
            sampler: Sampler = DistributedSampler(self.dataset, self.world, self.rank, shuffle=True,
                                                  seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(self.dataset, generator=gen)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            drop_last=True, pin_memory=self.pin_memory, generator=gen,
            persistent_workers=False,
        )


def build_loaders(cfg, train_set: Dataset, val_set: Dataset, rank: int = 0, world: int = 1,
                  pin_memory: bool = False):
    """``(EpochLoader for training, DataLoader over this rank's validation shard)``."""
    if cfg.SOLVER.BATCH_SIZE % world:
        raise ValueError(f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} is not divisible by {world} workers")
    per_rank = cfg.SOLVER.BATCH_SIZE // world
    train = EpochLoader(train_set, per_rank, cfg.DATASET.NUM_WORKERS, cfg.SEED, rank, world, pin_memory)
    val = DataLoader(val_set, batch_size=cfg.DATASET.TEST_BATCH_SIZE,
                     sampler=ShardSampler(len(val_set), rank, world),
                     num_workers=cfg.DATASET.NUM_WORKERS, pin_memory=pin_memory)
    return train, val
