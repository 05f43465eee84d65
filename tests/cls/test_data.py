"""Classification data: CIFAR-100 pickle files, ImageFolder layout, embedded digits, samplers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from deepkd_det.cls.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetMissingError,
    EpochLoader,
    ShardSampler,
    build_cifar100,
    build_digits,
    build_imagenet,
)


def test_cifar100_reads_release_format(tmp_path, write_cifar100):
    written = write_cifar100(str(tmp_path))
    train, val, num_classes = build_cifar100(str(tmp_path))
    assert num_classes == 100 and len(train) == 6 and len(val) == 4
    assert train.classes[7] == "class_7"
    mean = torch.tensor(CIFAR100_MEAN)[:, None, None]
    std = torch.tensor(CIFAR100_STD)[:, None, None]
    for i in range(4):
        image, label = val[i]
        assert image.shape == (3, 32, 32)
        assert label == written["test"]["fine_labels"][i]
        # The validation transform is only ToTensor + Normalize: undo it and compare with the raw row.
        raw = torch.from_numpy(written["test"]["data"][i].reshape(3, 32, 32).astype(np.float32)) / 255.0
        torch.testing.assert_close(image * std + mean, raw, atol=1e-5, rtol=0)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == written["train"]["fine_labels"][0]


def test_cifar100_missing_names_the_expected_directory(tmp_path):
    with pytest.raises(DatasetMissingError, match="cifar-100-python"):
        build_cifar100(str(tmp_path / "nowhere"))


def test_cifar100_incomplete_folder_is_refused(tmp_path, write_cifar100):
    write_cifar100(str(tmp_path))
    os.remove(tmp_path / "cifar-100-python" / "test")
    with pytest.raises(DatasetMissingError, match="incomplete"):
        build_cifar100(str(tmp_path))


def test_imagenet_class_folders(tmp_path, write_image_folder):
    colours = write_image_folder(str(tmp_path), ["n001", "n002", "n003"])
    train, val, num_classes = build_imagenet(str(tmp_path))
    assert num_classes == 3 and len(train) == 6 and len(val) == 6
    image, label = train[0]
    assert image.shape == (3, 224, 224) and label == 0
    # A uniformly coloured validation image stays uniform through Resize + CenterCrop.
    image, label = val[3]  # sorted: n002/1.png
    assert label == 1
    colour = torch.tensor(colours[("val", "n002", 1)], dtype=torch.float32) / 255.0
    expected = (colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    assert float(image.std(dim=(1, 2)).max()) < 1e-4


def test_imagenet_missing_and_mismatched_folders(tmp_path, write_image_folder):
    with pytest.raises(DatasetMissingError, match="train"):
        build_imagenet(str(tmp_path))
    write_image_folder(str(tmp_path), ["a", "b"])
    os.makedirs(tmp_path / "train" / "c")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / "0.png")
    with pytest.raises(DatasetMissingError, match="only in train: \\['c'\\]"):
        build_imagenet(str(tmp_path))


def test_digits_split_is_deterministic_stratified_and_normalised():
    train, val, num_classes = build_digits(size=16, val_fraction=0.3, split_seed=0)
    assert num_classes == 10
    assert len(train) + len(val) == 1797
    assert train.images.shape[1:] == (3, 16, 16)
    train2, val2, _ = build_digits(size=16, val_fraction=0.3, split_seed=0)
    assert torch.equal(train.images, train2.images) and torch.equal(val.labels, val2.labels)
    counts = torch.bincount(val.labels, minlength=10)
    assert int(counts.min()) >= 50  # every class in the validation split (about 54 each)
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1.0) < 1e-3
    # No training image is also a validation image.
    flat_train = {tuple(x.flatten()[::7].tolist()) for x in train.images[:, 0]}
    assert not any(tuple(x.flatten()[::7].tolist()) in flat_train for x in val.images[:50, 0])
    other, _, _ = build_digits(size=16, val_fraction=0.3, split_seed=1)
    assert not torch.equal(other.labels, train.labels)


def test_digits_training_images_are_shifted_but_validation_images_are_not():
    train, val, _ = build_digits(size=16, train_limit=10)
    assert len(train) == 10
    torch.manual_seed(0)
    crops = {tuple(train[0][0][0].flatten().tolist()) for _ in range(10)}
    assert len(crops) > 1  # random shifts
    assert torch.equal(val[0][0], val[0][0])


def test_epoch_loader_order_depends_only_on_seed_and_epoch():
    train, _, _ = build_digits(size=8, train_limit=64)
    loader = EpochLoader(train, batch_size=8, num_workers=0, seed=3)
    assert len(loader) == 8

    def labels(epoch):
        torch.manual_seed(123)  # the crops use the global generator; the order must not
        return torch.cat([y for _, y in loader(epoch)])

    assert torch.equal(labels(1), labels(1))
    assert not torch.equal(labels(1), labels(2))


def test_distributed_shards_are_disjoint():
    train, _, _ = build_digits(size=8, train_limit=64)
    seen = []
    for rank in range(2):
        loader = EpochLoader(train, batch_size=8, num_workers=0, seed=0, rank=rank, world=2)
        assert len(loader) == 4
        seen.append(set(loader(0).sampler))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 64
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_loader_refuses_a_set_smaller_than_one_batch():
    train, _, _ = build_digits(size=8, train_limit=10)
    with pytest.raises(ValueError, match="smaller than one batch"):
        EpochLoader(train, batch_size=16, num_workers=0, seed=0)


def test_digits_per_class_subset_is_stratified_and_keeps_the_whole_split_normalisation():
    full, val_full, _ = build_digits(size=8)
    subset, val, _ = build_digits(size=8, train_per_class=3)
    assert torch.bincount(subset.labels, minlength=10).tolist() == [3] * 10
    # The teacher (whole split) and the student (subset) see identically normalised pixels.
    assert (subset.mean, subset.std) == (full.mean, full.std)
    assert torch.equal(val.images, val_full.images)
    rows = {tuple(x.flatten().tolist()) for x in full.images[:, 0]}
    assert all(tuple(x.flatten().tolist()) in rows for x in subset.images[:, 0])
