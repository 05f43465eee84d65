"""Fixtures of the classification tests: tiny digits configurations, files in the real dataset
formats, a trained teacher, single-threaded torch."""

from __future__ import annotations

import os
import pickle
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from deepkd_det.cls.config import load_cfg

TINY: Dict[str, object] = {
    "DEVICE": "cpu",
    "SEED": 0,
    "DATASET.TYPE": "digits",
    "DATASET.NUM_WORKERS": 0,
    "DATASET.TEST_BATCH_SIZE": 512,
    "DATASET.DIGITS.SIZE": 8,
    "DATASET.DIGITS.TRAIN_LIMIT": 256,
    "DISTILLER.STUDENT": "resnet8",
    "SOLVER.EPOCHS": 3,
    "SOLVER.BATCH_SIZE": 32,
    "SOLVER.LR": 0.05,
    "SOLVER.LR_SCHEDULER": "step",
    "SOLVER.LR_DECAY_STAGES": [2],
    "KD.CE_WEIGHT": 0.5,
    "KD.KD_WEIGHT": 0.5,
    "DKD.BETA": 2.0,
    "DKD.WARMUP": 1.0,
    "LOG.PROGRESS_BAR": False,
    "LOG.TENSORBOARD": False,
}


def _tiny_cfg(out_dir, **overrides):
    """A validated, frozen config: resnet8 on 8x8 digits, 256 training images, 3 epochs of 8 steps."""
    opts = {**TINY, "OUTPUT_DIR": str(out_dir)}
    opts.update({k.replace("__", "."): v for k, v in overrides.items()})
    flat = []
    for key, value in opts.items():
        flat += [key, value]
    return load_cfg(None, flat)


def _train_teacher(out_dir) -> str:
    """Train a resnet8 digits teacher (cross-entropy, 4 epochs); returns its ckpt_epoch_4.pth."""
    from deepkd_det.cls.engine import ClsTrainer

    cfg = _tiny_cfg(out_dir, DISTILLER__TYPE="NONE", SOLVER__EPOCHS=4, SOLVER__LR_DECAY_STAGES=[3],
                   DATASET__DIGITS__TRAIN_LIMIT=512, LOG__SAVE_EVERY=100)
    ClsTrainer(cfg).train()
    path = os.path.join(str(out_dir), "ckpt_epoch_4.pth")
    assert os.path.isfile(path)
    return path


def _write_cifar100(root, n_train=6, n_test=4, seed=0):
    """cifar-100-python/{train,test,meta} in the release's format: dicts of N x 3072 uint8 rows
    (1024 red, then green, then blue values, row-major), fine and coarse labels."""
    rng = np.random.RandomState(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.randint(0, 100, size=n).tolist()
        entry = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
        out[name] = entry
    meta = {"fine_label_names": [f"class_{i}" for i in range(100)],
            "coarse_label_names": [f"super_{i}" for i in range(20)]}
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f)
    return out


def _write_image_folder(root, classes, per_class=2, size=(40, 30)):
    colours = {}
    for split in ("train", "val"):
        for ci, cls in enumerate(classes):
            os.makedirs(os.path.join(root, split, cls))
            for k in range(per_class):
                colour = (20 * ci + 5 * k, 100 + 10 * ci, 200 - 30 * k)
                Image.new("RGB", size, colour).save(os.path.join(root, split, cls, f"{k}.png"))
                colours[(split, cls, k)] = colour
    return colours


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Every classification test module runs single-threaded (tests/conftest.py: one_thread)."""
    yield



@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(out_dir, **overrides)``: a validated, frozen config (``A__B=v`` sets ``A.B``)."""
    return _tiny_cfg


@pytest.fixture
def write_cifar100():
    """``write_cifar100(root, n_train, n_test, seed)``: CIFAR-100 files in the release format."""
    return _write_cifar100


@pytest.fixture
def write_image_folder():
    """``write_image_folder(root, classes, per_class, size)``: an ImageNet-style class-folder tree."""
    return _write_image_folder


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A digits classification teacher, trained once per module that asks for it."""
    return _train_teacher(tmp_path_factory.mktemp("teacher"))
