# FCOS (detectron2 after v0.6 only: detectron2.modeling.meta_arch.fcos) on the shapes demo: a tiny
# R-18-FPN FCOS student (P3-P7, 64 channels) distilled by DiffKD on the FPN levels from an FCOS
# teacher of the same architecture (its weights: a run of this file with parts=[] and
# model.teacher=None is not needed: name any FCOS checkpoint in model.teacher.weights). The
# DiffKD Table 4 pair is FCOS R-101 -> R-50 (teacher 40.8, student 38.5, DiffKD 42.4 AP).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

from deepkd_det.det.distill.lazy import distill_detector, part, teacher_from

from .shapes import dataloader, datasets, deepkd, lr_multiplier, optimizer, train  # noqa: F401

detector = L(FCOS)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=64,
        top_block=L(LastLevelP6P7)(in_channels=64, out_channels=64, in_feature="p5"),
    ),
    # (no GN in the tiny head: detectron2 v0.6's FCOSHead puts it on its 1-channel centerness layer too)
    head=L(FCOSHead)(input_shape=[ShapeSpec(channels=64)] * 5, conv_dims=[64, 64], num_classes=3, prior_prob=0.01),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=3,
    test_score_thresh=0.05,
    test_nms_thresh=0.6,
    max_detections_per_image=20,
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
)

model = L(distill_detector)(
    student=detector,
    teacher=L(teacher_from)(model=detector, weights="output/demo-lazy/fcos-teacher/model_final.pth",
                            input_format="BGR"),
    parts=[L(part)(name="diffkd", DIFFKD=dict(ENABLED=True, IN_FEATURES=["p3", "p4", "p5", "p6", "p7"]))],
    input_format="BGR",  # FCOS states no channel order: the dataloader's (image_format)
)

optimizer.lr = 0.01
train.output_dir = "output/demo-lazy/fcos-diffkd"
