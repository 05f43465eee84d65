"""Segmentation data: generated scenes, Cityscapes' layout and train ids, own folders, the start-up checks,
the augmentation, and mIoU against detectron2's SemSegEvaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepkd_det.seg.config import load_seg_cfg
from deepkd_det.seg.data import (
    CITYSCAPES_ID_TO_TRAINID,
    DatasetError,
    SyntheticScenes,
    build_seg_datasets,
    iteration_batches,
    train_sample,
)
from deepkd_det.seg.evaluation import ConfusionMatrix, miou_from_confusion


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def test_synthetic_scenes_are_deterministic_and_labelled():
    a, b = SyntheticScenes(5, 48, 3, seed=4), SyntheticScenes(3, 48, 3, seed=4)
    img, lab = a[2]
    assert img.shape == (48, 48, 3) and lab.shape == (48, 48)
    np.testing.assert_array_equal(lab, b[2][1])  # a smaller set is the first scenes of the same stream
    np.testing.assert_array_equal(img, b[2][0])
    values = set(np.unique(np.concatenate([a[i][1].ravel() for i in range(5)])).tolist())
    assert {0, 255} <= values and values - {255} <= {0, 1, 2, 3} and len(values - {0, 255}) >= 2
    assert not np.array_equal(SyntheticScenes(3, 48, 3, seed=4, split="val")[0][1], lab)


def test_cityscapes_layout_train_ids_and_raw_ids(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.array([[7, 8, 26, 0], [33, 24, 1, 11]], dtype=np.uint8)  # road, sidewalk, car, unlabeled / ...
    for split in ("train", "val"):
        _png(root / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", np.zeros((2, 4, 3)))
        _png(root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", ids)
    cfg = load_seg_cfg(None, ["DATASET.TYPE", "cityscapes", "DATASET.ROOT", str(root)])
    train, val, classes = build_seg_datasets(cfg)
    assert len(classes) == 19 and len(train) == len(val) == 1
    expect = np.vectorize(lambda v: CITYSCAPES_ID_TO_TRAINID.get(int(v), 255))(ids)
    np.testing.assert_array_equal(train[0][1], expect)
    assert expect.tolist() == [[0, 1, 13, 255], [18, 11, 255, 2]]
    # With createTrainIdLabelImgs' files present they are read as they are.
    for split in ("train", "val"):
        _png(root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", expect)
    np.testing.assert_array_equal(build_seg_datasets(cfg)[0][0][1], expect)


def _folder(tmp_path, label=None, size=(6, 5), classes="a\nb\nc\n"):
    root = tmp_path / "own"
    for split in ("train", "val"):
        _png(root / split / "images" / "x1.jpg", np.full((*size, 3), 100))
        _png(root / split / "labels" / "x1.png", np.zeros(size) if label is None else label)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


def test_own_folder_and_its_start_up_checks(tmp_path):
    root = _folder(tmp_path, label=np.array([[0, 1, 2, 255, 0]] * 6))
    cfg = load_seg_cfg(None, ["DATASET.TYPE", "folder", "DATASET.ROOT", str(root)])
    train, val, classes = build_seg_datasets(cfg)
    assert classes == ("a", "b", "c") and train[0][0].shape == (6, 5, 3)

    bad = _folder(tmp_path / "v", label=np.array([[0, 1, 3, 7, 0]] * 6))
    with pytest.raises(DatasetError, match=r"x1.png: label values \[3, 7\] are outside the class list"):
        build_seg_datasets(load_seg_cfg(None, ["DATASET.TYPE", "folder", "DATASET.ROOT", str(bad)]))

    mism = _folder(tmp_path / "s")
    _png(mism / "val" / "labels" / "x1.png", np.zeros((4, 5)))
    with pytest.raises(DatasetError, match="label is 5x4 but its image .* is 5x6"):
        build_seg_datasets(load_seg_cfg(None, ["DATASET.TYPE", "folder", "DATASET.ROOT", str(mism)]))

    missing = _folder(tmp_path / "m")
    (missing / "train" / "labels" / "x1.png").unlink()
    with pytest.raises(DatasetError, match="missing file: .*train/labels/x1.png"):
        build_seg_datasets(load_seg_cfg(None, ["DATASET.TYPE", "folder", "DATASET.ROOT", str(missing)]))

    nolist = _folder(tmp_path / "n", classes=None)
    with pytest.raises(DatasetError, match="no class list"):
        build_seg_datasets(load_seg_cfg(None, ["DATASET.TYPE", "folder", "DATASET.ROOT", str(nolist)]))
    with pytest.raises(DatasetError, match="DATASET.ROOT not found"):
        build_seg_datasets(load_seg_cfg(None, ["DATASET.TYPE", "folder", "DATASET.ROOT", str(tmp_path / "nope")]))


def test_augmentation_moves_image_and_label_together():
    # Image channel 0 encodes the label, so after scale / crop / flip they must still agree.
    lab = np.zeros((20, 30), dtype=np.uint8)
    lab[:, 10:] = 1
    lab[5:9, 20:] = 2
    img = np.stack([lab * 100.0, np.zeros_like(lab), np.zeros_like(lab)], -1)
    rng = np.random.default_rng(0)
    seen_pad = False
    for _ in range(20):
        x, y = train_sample(img, lab, rng, scale_range=(0.5, 2.0), crop=(24, 24), flip=True, mean=(0, 0, 0),
                            std=(1, 1, 1))
        assert x.shape == (3, 24, 24) and y.shape == (24, 24)
        inside = y != 255
        seen_pad |= bool((~inside).any())
        # Away from edges (bilinear image vs nearest label), the image's value is 100 * label.
        yf = y[None].float()
        core = inside & (torch.nn.functional.max_pool2d(yf, 7, 1, 3)[0] == y) & \
            (-torch.nn.functional.max_pool2d(-yf, 7, 1, 3)[0] == y)
        assert torch.allclose(x[0][core], 100.0 * y[core].float(), atol=1e-3)
    assert seen_pad  # a scale below crop / size pads with the ignore label


def test_iteration_batches_depend_only_on_the_iteration():
    full = list(iteration_batches(7, 3, seed=1, start_iter=0, max_iter=6))
    assert list(iteration_batches(7, 3, seed=1, start_iter=4, max_iter=6)) == full[4:]
    flat = [k[0] for batch in full[:7] for k in batch[:]]
    assert sorted(flat[:7]) == list(range(7))  # each epoch is a permutation


def test_miou_definition_and_detectron2_parity(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    c = 4
    gts = [rng.integers(0, c, (9, 11)) for _ in range(3)]
    for g in gts:
        g[rng.random(g.shape) < 0.2] = 255
        g[g == 3] = 0  # class 3 never in the ground truth ...
    preds = [rng.integers(0, c, (9, 11)) for _ in range(3)]  # ... but predicted: it counts as 0 in the mean
    conf = ConfusionMatrix(c)
    for p, g in zip(preds, gts):
        conf.update(torch.from_numpy(p), torch.from_numpy(g))
    ours = conf.compute(("a", "b", "c", "d"))
    # By hand: IoU of classes 0..2, averaged over the 4 classes in the gt or the predictions.
    ious = []
    for k in range(3):
        tp = sum(((p == k) & (g == k)).sum() for p, g in zip(preds, gts))
        union = sum((((p == k) & (g != 255)) | (g == k)).sum() for p, g in zip(preds, gts))
        ious.append(tp / union)
    assert ours["mIoU"] == pytest.approx(100 * sum(ious) / 4)
    assert conf.compute(classes="gt")["mIoU"] == pytest.approx(100 * sum(ious) / 3)  # gt classes only
    assert np.isnan(ours["IoU-d"])

    sem = pytest.importorskip("detectron2.evaluation.sem_seg_evaluation")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name, value in (("int", int), ("float", float)):  # detectron2 v0.6 still spells np.int / np.float
        if not hasattr(np, name):
            monkeypatch.setattr(np, name, value, raising=False)
    records = []
    for i, g in enumerate(gts):
        _png(tmp_path / f"gt{i}.png", g)
        records.append({"file_name": f"img{i}.png", "sem_seg_file_name": str(tmp_path / f"gt{i}.png")})
    name = f"deepkd_seg_parity_{id(tmp_path)}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c", "d"], ignore_label=255, evaluator_type="sem_seg")
    ev = sem.SemSegEvaluator(name, distributed=False)
    ev.reset()
    for i, p in enumerate(preds):
        logits = torch.nn.functional.one_hot(torch.from_numpy(p), c).permute(2, 0, 1).float()
        ev.process([{"file_name": f"img{i}.png"}], [{"sem_seg": logits}])
    theirs = ev.evaluate()["sem_seg"]
    # detectron2 after v0.6 averages over the ground-truth classes only ("gt"); v0.6 over "union".
    import inspect

    newer = "logical_and(acc_valid" in inspect.getsource(sem.SemSegEvaluator.evaluate)
    ours = conf.compute(("a", "b", "c", "d"), "gt" if newer else "union")
    assert ours["mIoU"] == pytest.approx(theirs["mIoU"], abs=1e-9)
    assert ours["pACC"] == pytest.approx(theirs["pACC"], abs=1e-9)
    assert ours["mACC"] == pytest.approx(theirs["mACC"], abs=1e-9)
    assert miou_from_confusion(conf.matrix.numpy(), classes="gt" if newer else "union")["mIoU"] == ours["mIoU"]
