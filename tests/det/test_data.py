"""Datasets: the synthetic shapes generator and COCO-json registration from the config."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from PIL import Image  # noqa: E402

from deepkd_det.det.data import (  # noqa: E402
    ALL_SHAPE_CATEGORIES,
    SHAPE_CATEGORIES,
    SHAPES_TRAIN,
    SHAPES_VAL,
    add_data_config,
    generate_shapes_dataset,
    register_coco_dataset,
    register_datasets_from_cfg,
    render_shapes_image,
)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def _shoelace(flat):
    xs, ys = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return root, generate_shapes_dataset(root, num_train=6, num_val=3, image_size=64, seed=3)


def test_generator_is_deterministic_and_seeded(shapes, tmp_path):
    root, _ = shapes
    again = str(tmp_path / "again")
    generate_shapes_dataset(again, num_train=6, num_val=3, image_size=64, seed=3)
    assert _digest(again) == _digest(root)
    other = str(tmp_path / "other")
    generate_shapes_dataset(other, num_train=6, num_val=3, image_size=64, seed=4)
    assert _digest(other) != _digest(root)


def test_generated_annotations_are_consistent_coco(shapes):
    _, paths = shapes
    json_file, image_dir = paths["train"]
    with open(json_file) as f:
        data = json.load(f)
    assert data["categories"] == SHAPE_CATEGORIES and [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert len(data["images"]) == 6 and len(data["annotations"]) >= 6
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        assert Image.open(os.path.join(image_dir, im["file_name"])).size == (im["width"], im["height"]) == (64, 64)
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
        # bbox (XYWH) is the tight box of the outline of the drawn pixels, area the polygons' area.
        xs = [v for poly in ann["segmentation"] for v in poly[0::2]]
        ys = [v for poly in ann["segmentation"] for v in poly[1::2]]
        assert [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)] == [x, y, w, h]
        assert 0 < ann["area"] <= w * h
        assert ann["area"] == sum(_shoelace(poly) for poly in ann["segmentation"])


def test_shapes_registered_from_cfg_and_loaded_by_detectron2(shapes):
    root, _ = shapes
    cfg = add_data_config(get_cfg())
    cfg.DATASETS.SHAPES.ROOT = root
    cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL = 6, 3
    cfg.DATASETS.SHAPES.IMAGE_SIZE, cfg.DATASETS.SHAPES.SEED = 64, 3
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (SHAPES_TRAIN,), (SHAPES_VAL,)
    register_datasets_from_cfg(cfg)
    dicts = DatasetCatalog.get(SHAPES_TRAIN)
    assert len(dicts) == 6 and len(DatasetCatalog.get(SHAPES_VAL)) == 3
    assert MetadataCatalog.get(SHAPES_TRAIN).thing_classes == ["circle", "square", "triangle"]
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 1, 2}  # contiguous ids


def _write_custom_coco(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(images / "a.png")
    Image.new("RGB", (40, 30), (200, 20, 30)).save(images / "b.png")
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 9, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 8, "bbox": [3, 4, 5, 6], "area": 30, "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 8, "name": "dog"}],
    }
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), str(images)


def test_custom_coco_dataset_from_config_and_command_line(tmp_path):
    json_file, images = _write_custom_coco(tmp_path)
    cfg = add_data_config(get_cfg())
    # The command-line form: trailing KEY VALUE opts of train_net.py.
    cfg.merge_from_list(["DATASETS.REGISTER", f"[['my_custom_train', '{json_file}', '{images}']]"])
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("my_custom_train",), ()
    register_datasets_from_cfg(cfg)
    dicts = DatasetCatalog.get("my_custom_train")
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["a.png", "b.png"]
    assert [d["image_id"] for d in dicts] == [7, 9]
    assert dicts[0]["annotations"][0]["bbox"] == [1, 2, 10, 12]
    assert [d["annotations"][0]["category_id"] for d in dicts] == [0, 1]
    meta = MetadataCatalog.get("my_custom_train")
    assert meta.thing_classes == ["cat", "dog"] and meta.evaluator_type == "coco"
    # Re-registering the same name at another place replaces it (a new run, a new directory).
    (tmp_path / "second").mkdir()
    json2, images2 = _write_custom_coco(tmp_path / "second")
    register_coco_dataset("my_custom_train", json2, images2)
    assert MetadataCatalog.get("my_custom_train").json_file == json2


def test_missing_paths_and_names_fail_at_start_up_with_the_name(tmp_path):
    json_file, images = _write_custom_coco(tmp_path)
    cfg = add_data_config(get_cfg())
    cfg.DATASETS.TEST = ()
    cfg.DATASETS.REGISTER = [["broken_json", str(tmp_path / "nope.json"), images]]
    cfg.DATASETS.TRAIN = ("broken_json",)
    with pytest.raises(FileNotFoundError, match=r"broken_json.*nope\.json.*does not exist"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.REGISTER = [["broken_dir", json_file, str(tmp_path / "no_images")]]
    cfg.DATASETS.TRAIN = ("broken_dir",)
    with pytest.raises(FileNotFoundError, match=r"broken_dir.*image folder.*no_images"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.REGISTER = [["only_two", json_file]]
    with pytest.raises(ValueError, match=r"\[name, json_file, image_dir\]"):
        register_datasets_from_cfg(cfg)
    cfg.DATASETS.REGISTER = []
    cfg.DATASETS.TRAIN = ("never_registered",)
    with pytest.raises(KeyError, match="never_registered.*DATASETS.REGISTER"):
        register_datasets_from_cfg(cfg)


def test_builtin_coco_without_files_points_to_the_readme(tmp_path, monkeypatch):
    # detectron2 registered coco_2017_val at import under $DETECTRON2_DATASETS (default ./datasets).
    monkeypatch.chdir(tmp_path)
    cfg = add_data_config(get_cfg())
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ("coco_2017_val",)
    with pytest.raises(FileNotFoundError, match=r"coco_2017_val.*instances_val2017\.json.*datasets/README\.md"):
        register_datasets_from_cfg(cfg)
    json_file, images = _write_custom_coco(tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset("coco_2017_val", json_file, images)


def test_six_class_set_draws_every_shape_with_tight_boxes(tmp_path):
    # num_classes 6 adds pentagons, hexagons and stars (ids 4..6) to the three default shapes.
    paths = generate_shapes_dataset(str(tmp_path), num_train=30, num_val=2, image_size=64, seed=0, num_classes=6)
    with open(paths["train"][0]) as f:
        data = json.load(f)
    assert data["categories"] == ALL_SHAPE_CATEGORIES
    assert [c["name"] for c in data["categories"][3:]] == ["pentagon", "hexagon", "star"]
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4, 5, 6}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        xs = [v for poly in ann["segmentation"] for v in poly[0::2]]
        assert (min(xs), max(xs)) == (x, x + w)
        assert ann["area"] == sum(_shoelace(poly) for poly in ann["segmentation"])
    # Another class count is another dataset: the split is regenerated, not reused.
    generate_shapes_dataset(str(tmp_path), num_train=30, num_val=2, image_size=64, seed=0, num_classes=3)
    with open(paths["train"][0]) as f:
        assert json.load(f)["categories"] == SHAPE_CATEGORIES
    with pytest.raises(ValueError, match="num_classes must lie in 1..6, got 7"):
        generate_shapes_dataset(str(tmp_path / "x"), num_train=1, num_val=1, num_classes=7)


def test_shapes_num_classes_from_cfg_reaches_detectron2(tmp_path):
    cfg = add_data_config(get_cfg())
    cfg.DATASETS.SHAPES.ROOT = str(tmp_path)
    cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL, cfg.DATASETS.SHAPES.IMAGE_SIZE = 20, 2, 64
    cfg.DATASETS.SHAPES.NUM_CLASSES = 6
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (SHAPES_TRAIN,), (SHAPES_VAL,)
    register_datasets_from_cfg(cfg)
    names = ["circle", "square", "triangle", "pentagon", "hexagon", "star"]
    assert MetadataCatalog.get(SHAPES_TRAIN).thing_classes == names
    assert {a["category_id"] for d in DatasetCatalog.get(SHAPES_TRAIN) for a in d["annotations"]} == set(range(6))


# ---------------------------------------------------------------- masks of the shapes set


def test_segmentations_are_the_drawn_pixels_exactly():
    """pycocotools' rasterisation of each object's polygons is the object's drawn pixels (IoU 1,
    well above 0.9), its area their pixel count and the polygons' area, its box their tight box;
    asking for the masks changes neither the image nor the objects (same random stream)."""
    from pycocotools import mask as mask_util

    from deepkd_det.det.data.synthetic import polygon_area

    checked = 0
    for index in range(12):
        size = 64 if index % 2 else 96
        canvas, objects, masks = render_shapes_image(np.random.default_rng([5, index]), size, 4, 6, return_masks=True)
        canvas2, objects2 = render_shapes_image(np.random.default_rng([5, index]), size, 4, 6)
        assert objects2 == objects and np.array_equal(np.asarray(canvas), np.asarray(canvas2))
        seen = np.zeros((size, size), dtype=bool)
        for obj, drawn in zip(objects, masks):
            rles = mask_util.frPyObjects(obj["segmentation"], size, size)
            raster = mask_util.decode(mask_util.merge(rles)).astype(bool)
            iou = (raster & drawn).sum() / (raster | drawn).sum()
            assert iou > 0.9 and np.array_equal(raster, drawn)
            assert obj["area"] == drawn.sum() == sum(polygon_area(p) for p in obj["segmentation"])
            ys, xs = np.nonzero(drawn)
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            # The object's colour covers its pixels in the image (objects never overlap).
            assert not (seen & drawn).any()
            seen |= drawn
            checked += 1
    assert checked >= 20


def test_mask_outlines_of_hand_made_masks():
    from deepkd_det.det.data.synthetic import mask_outlines

    m = np.zeros((6, 7), dtype=bool)
    m[1:4, 2:5] = True  # a 3 x 3 square at x 2..4, y 1..3
    assert mask_outlines(m) == [[2, 1, 5, 1, 5, 4, 2, 4]]
    m[4, 5] = True  # a pixel touching the square at one corner only: a second piece
    assert sorted(mask_outlines(m)) == [[2, 1, 5, 1, 5, 4, 2, 4], [5, 4, 6, 4, 6, 5, 5, 5]]
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    with pytest.raises(ValueError, match="hole"):
        mask_outlines(ring)


def test_split_of_the_old_generator_is_rewritten_with_the_same_images(tmp_path):
    """A split written by the v1 generator (other polygons) is rewritten once, with byte-identical
    images and the same boxes; a current split is reused untouched."""
    root = str(tmp_path)
    paths = generate_shapes_dataset(root, num_train=3, num_val=2, image_size=64, seed=7)
    json_file, image_dir = paths["train"]
    with open(json_file) as f:
        data = json.load(f)
    images_before = _digest(image_dir)
    old = json.loads(json.dumps(data))
    old["info"]["deepkd_params"]["generator"] = "deepkd_det.det.data.synthetic v1"
    for ann in old["annotations"]:
        ann["segmentation"] = [[0, 0, 1, 0, 1, 1]]
    with open(json_file, "w") as f:
        json.dump(old, f)
    generate_shapes_dataset(root, num_train=3, num_val=2, image_size=64, seed=7)
    with open(json_file) as f:
        assert json.load(f) == data
    assert _digest(image_dir) == images_before
    stamp = os.stat(json_file).st_mtime_ns
    generate_shapes_dataset(root, num_train=3, num_val=2, image_size=64, seed=7)
    assert os.stat(json_file).st_mtime_ns == stamp


def test_perfect_predictions_score_ap_100_for_bbox_and_segm(tmp_path):
    """detectron2's COCOEvaluator on a generated split, fed the ground truth (boxes and the
    polygons rasterised as masks) as predictions: bbox and segm AP 100."""
    import torch
    from detectron2.data.detection_utils import annotations_to_instances
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Instances

    from deepkd_det.det.engine.trainer import uses_fast_coco_eval

    paths = generate_shapes_dataset(str(tmp_path), num_train=1, num_val=4, image_size=64, seed=11)
    json_file, image_dir = paths["val"]
    register_coco_dataset("deepkd_test_masks_val", json_file, image_dir)

    def evaluate(shift):
        evaluator = COCOEvaluator("deepkd_test_masks_val", tasks=("bbox", "segm"), distributed=False,
                                  output_dir=str(tmp_path / "eval"), use_fast_impl=uses_fast_coco_eval())
        evaluator.reset()
        for record in DatasetCatalog.get("deepkd_test_masks_val"):
            size = (record["height"], record["width"])
            gt = annotations_to_instances(record["annotations"], size, mask_format="bitmask")
            masks = torch.roll(gt.gt_masks.tensor, shifts=shift, dims=2)
            pred = Instances(size, pred_boxes=gt.gt_boxes, pred_classes=gt.gt_classes,
                             scores=torch.ones(len(gt)), pred_masks=masks)
            evaluator.process([{"image_id": record["image_id"]}], [{"instances": pred}])
        return evaluator.evaluate()

    results = evaluate(0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    # Masks two pixels off: the boxes still score 100, the masks no longer do.
    results = evaluate(2)
    assert results["bbox"]["AP"] == pytest.approx(100.0) and results["segm"]["AP"] < 90


# ---------------------------------------------------------------- class counts and masks of own data


def _own_cfg(tmp_path, name, edit=None):
    from deepkd_det.det.config import add_deepkd_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    json_file, images = _write_custom_coco(tmp_path)
    if edit is not None:
        data = json.loads(open(json_file).read())
        edit(data)
        open(json_file, "w").write(json.dumps(data))
    cfg = add_data_config(add_deepkd_config(get_cfg()))
    cfg.DATASETS.REGISTER = [[name, json_file, images]]
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    return cfg


def test_class_count_zero_is_taken_from_the_json_for_retinanet_too(tmp_path):
    """NUM_CLASSES 0 of the head the detector uses (RetinaNet: MODEL.RETINANET.NUM_CLASSES,
    through the distillation wrapper too; the teacher's the same) becomes the json's 2
    categories; a wrong count of that head is refused by name, other heads' counts play no part."""
    from detectron2.config import CfgNode as CN

    from deepkd_det.det.data import check_num_classes, class_count_key, needs_class_count, resolve_num_classes

    cfg = _own_cfg(tmp_path, "own_rt_train")
    register_datasets_from_cfg(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DistillDetector"
    cfg.KD.STUDENT_ARCHITECTURE = "RetinaNet"
    assert class_count_key(cfg) == "MODEL.RETINANET.NUM_CLASSES" and not needs_class_count(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = cfg.TEACHER.MODEL.RETINANET.NUM_CLASSES = 0
    assert needs_class_count(cfg)
    resolve_num_classes(cfg)
    assert (cfg.MODEL.RETINANET.NUM_CLASSES, cfg.TEACHER.MODEL.RETINANET.NUM_CLASSES) == (2, 2)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80  # not 0: left as it is, and not checked for RetinaNet
    check_num_classes(cfg, ["own_rt_train"])
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    with pytest.raises(ValueError, match=r"MODEL\.RETINANET\.NUM_CLASSES=5, but dataset 'own_rt_train' .*2 categories"):
        check_num_classes(cfg, ["own_rt_train"])
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"  # a plain RetinaNet: the same key
    assert class_count_key(cfg) == "MODEL.RETINANET.NUM_CLASSES"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"  # R-CNN: the ROI heads' count (80 != 2)
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.NUM_CLASSES=80"):
        check_num_classes(cfg, ["own_rt_train"])
    # An FCOS node (where a config has one) is resolved and checked the same way.
    cfg.MODEL.FCOS = CN({"NUM_CLASSES": 0})
    cfg.MODEL.META_ARCHITECTURE = "FCOS"
    resolve_num_classes(cfg)
    assert cfg.MODEL.FCOS.NUM_CLASSES == 2 and class_count_key(cfg) == "MODEL.FCOS.NUM_CLASSES"
    check_num_classes(cfg, ["own_rt_train"])


def test_segmentations_of_own_data_are_checked(tmp_path):
    """Polygons and RLEs of the image's size pass; a short polygon or an RLE of another size is
    refused naming the json; MODEL.MASK_ON refuses a json with an annotation without a mask."""
    from deepkd_det.det.data import check_mask_annotations

    def masks(d):
        d["annotations"][0]["segmentation"] = [[1, 2, 11, 2, 11, 14, 1, 14]]
        d["annotations"][1]["segmentation"] = {"size": [30, 40], "counts": [100, 20, 1080]}

    cfg = _own_cfg(tmp_path / "a", "own_masks_ok", masks)
    register_datasets_from_cfg(cfg)
    cfg.MODEL.MASK_ON = True
    check_mask_annotations(cfg, ["own_masks_ok"])

    def short(d):
        masks(d)
        d["annotations"][0]["segmentation"] = [[1, 2, 11, 2]]

    def other_size(d):
        masks(d)
        d["annotations"][1]["segmentation"]["size"] = [40, 30]

    for sub, edit, text in (("b", short, "at least 3 points"), ("c", other_size, r"RLE size \[40, 30\]")):
        with pytest.raises(ValueError, match=rf"train\.json.*annotation \d \(.\.png\): .*{text}"):
            register_datasets_from_cfg(_own_cfg(tmp_path / sub, f"own_masks_{sub}", edit))

    def one_missing(d):
        masks(d)
        del d["annotations"][1]["segmentation"]

    cfg = _own_cfg(tmp_path / "d", "own_masks_d", one_missing)
    register_datasets_from_cfg(cfg)
    check_mask_annotations(cfg, ["own_masks_d"])  # no mask head: nothing needed
    cfg.MODEL.MASK_ON = True
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON needs a mask .*'own_masks_d' \(.*train\.json\) has 1 "
                                         r"annotations without a 'segmentation' \(ids 2\)"):
        check_mask_annotations(cfg, ["own_masks_d"])
