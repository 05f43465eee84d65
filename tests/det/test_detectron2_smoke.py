"""The installed detectron2 works end to end: a Faster R-CNN R-18-FPN training step and a COCO
evaluation on a few generated images (proof that the install route is usable)."""

import json
import uuid

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402

from deepkd_det.det.config import model_zoo_config_file  # noqa: E402  (no detectron2.model_zoo import)


def write_coco(root, name, n_images, size=96, seed=0):
    """Images with filled rectangles of two colours (two categories) and their COCO json."""
    rng = np.random.default_rng(seed)
    img_dir = root / name
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n_images):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(2):
            cat = int(rng.integers(1, 3))
            w, h = (int(v) for v in rng.integers(20, 40, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            color = (0, 0, 255) if cat == 1 else (0, 255, 0)
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, thickness=-1)
            anns.append(
                dict(id=len(anns) + 1, image_id=i + 1, category_id=cat, bbox=[x, y, w, h], area=w * h, iscrowd=0)
            )
        fname = f"{i:04d}.png"
        cv2.imwrite(str(img_dir / fname), img)
        images.append(dict(id=i + 1, file_name=fname, width=size, height=size))
    cats = [dict(id=1, name="red"), dict(id=2, name="green")]
    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return json_path, img_dir


@pytest.fixture()
def coco_data(tmp_path):
    tag = uuid.uuid4().hex[:8]
    names = (f"smoke_train_{tag}", f"smoke_val_{tag}")
    for name, n in zip(names, (4, 2)):
        json_path, img_dir = write_coco(tmp_path, name, n, seed=n)
        register_coco_instances(name, {}, str(json_path), str(img_dir))
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def r18_fpn_cfg(train_name, val_name, out_dir):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    # From random init, FrozenBN (an identity) lets activations explode through the residual
    # sums; GroupNorm keeps them in range and has no running statistics to warm up.
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model still emits boxes to evaluate
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(out_dir)
    return cfg


def test_faster_rcnn_r18_fpn_trains_and_evaluates(coco_data, tmp_path):
    torch.manual_seed(0)
    cfg = r18_fpn_cfg(*coco_data, tmp_path / "out")
    trainer = DefaultTrainer(cfg)
    model = trainer.model
    assert model.backbone.bottom_up.res2[0].conv1.weight.shape[0] == 64  # really R-18 (basic blocks)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("roi_heads.box_predictor") for k in changed)
    assert any(k.startswith("backbone.bottom_up.res2") for k in changed)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["total_loss"])

    evaluator = COCOEvaluator(coco_data[1], output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    loader = build_detection_test_loader(cfg, coco_data[1])
    results = inference_on_dataset(model, loader, evaluator)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= results["bbox"]["AP50"] <= 100.0
