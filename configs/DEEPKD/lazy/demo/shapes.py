# LazyConfig twin of ../../demo/Base-Shapes.yaml + ../../demo/teacher.yaml: Faster R-CNN R-18-FPN
# (64-channel FPN, 128-d box head, BatchNorm: trained from scratch) on the generated shapes set
# (3 classes, 128 px images), CPU. The same model, data, schedule and seed as the yacs config:
# train_net.py on the yaml and tools/lazy_train_net.py on this file train the same weights.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.solver.build import get_default_optimizer_params
from omegaconf import OmegaConf
from torch.optim import SGD

from deepkd_det.core.settings import deepkd_settings_dict
from deepkd_det.det.lazy import multistep_lr

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=64,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=64, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[8], [16], [32], [64], [128]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=64,
        positive_fraction=0.5,
        pre_nms_topk=(256, 128),
        post_nms_topk=(64, 32),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=3,
        batch_size_per_image=32,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=64, height=7, width=7),
            conv_dims=[],
            fc_dims=[128, 128],
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=128),
            test_score_thresh=0.05,
            test_topk_per_image=20,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
        ),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="deepkd_shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(128,), max_size=128, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=False,
    ),
    total_batch_size=8,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="deepkd_shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}", tasks=("bbox",))

# The shapes set (the yacs DATASETS.SHAPES keys): generated under ROOT at the first run.
datasets = dict(SHAPES=dict(ROOT="datasets/deepkd_shapes", NUM_TRAIN=200, NUM_VAL=50, IMAGE_SIZE=128, SEED=0))

optimizer = L(SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)
# SOLVER.STEPS / WARMUP_ITERS of the yacs config (detectron2's WarmupMultiStepLR, gamma 0.1).
lr_multiplier = L(multistep_lr)(steps=[240], max_iter="${train.max_iter}", warmup_iters=20)

train = dict(
    output_dir="output/demo-lazy/teacher",
    init_checkpoint="",
    max_iter=300,
    amp=dict(enabled=False, dtype="fp16"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    checkpointer=dict(period=100, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device="cpu",
    seed=0,
)

deepkd = deepkd_settings_dict()  # DeepKD off: an ordinary detector (the demo teacher)
