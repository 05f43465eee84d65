# A modern teacher from detectron2's LazyConfig zoo distilling into an R-50-FPN Faster R-CNN
# through the feature parts: ViTDet-B Mask R-CNN (detectron2 after v0.6: ViT + simple feature
# pyramid P2-P6, RGB input) -> R-50-FPN (MSRA ImageNet, BGR), DiffKD on P2-P6 (levels pair by
# stride, 256 channels on both sides; the teacher runs on the student's padded batch, its channels
# flipped to RGB). Teacher weights: detectron2's ViTDet model zoo, mask_rcnn_vitdet_b_100ep
# (model_final_61ccd1.pkl), saved as pretrained/vitdet-b-mask-rcnn.pkl. DiffKD alone is a
# task-side (TOG) loss: DeepKD stays off (it needs a logit part).
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from deepkd_det.det.config import model_zoo_config_file
from deepkd_det.det.distill.lazy import part, teacher_from

from .base_r50_r101 import dataloader, deepkd, lr_multiplier, model, optimizer, train  # noqa: F401

model.teacher = L(teacher_from)(
    model=LazyConfig.load(model_zoo_config_file("common/models/mask_rcnn_vitdet.py")).model,
    weights="pretrained/vitdet-b-mask-rcnn.pkl",
)
model.parts = [L(part)(name="diffkd", DIFFKD=dict(ENABLED=True, IN_FEATURES=["p2", "p3", "p4", "p5", "p6"]))]
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "output/DEEPKD/lazy/DiffKD-ViTDetB-R50"
