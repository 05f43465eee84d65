# LazyConfig twin of ../Base-DeepKD-RCNN-FPN.yaml: the shared base of the COCO pairs, each setting
# written once. Student and teacher are detectron2's own LazyConfig Faster R-CNN + FPN (its
# common/models/mask_rcnn_fpn.py without the mask head: the values of Base-RCNN-FPN.yaml), DKD on
# the R-CNN box-head logits (alpha 1.0, beta 0.25, T 1), the 1x schedule (16 images / batch, lr
# 0.02, steps 60k / 80k, 90k iterations, 1000 warm-up iterations), COCO 2017 (detectron2's
# common/data/coco.py). The pair files set the student backbone, its input and
# train.init_checkpoint (the combined teacher + ImageNet-student file of tools/make_kd_weights.py,
# whose teacher.* keys are the teacher's weights, as in the yaml).
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.solver.build import get_default_optimizer_params
from torch.optim import SGD

from deepkd_det.core.settings import deepkd_settings_dict
from deepkd_det.det.config import model_zoo_config_file
from deepkd_det.det.distill.lazy import distill_detector, part, teacher_from
from deepkd_det.det.lazy import multistep_lr


def faster_rcnn_fpn(depth):
    """detectron2's LazyConfig R-<depth>-FPN Mask R-CNN without its mask head: Faster R-CNN."""
    detector = LazyConfig.load(model_zoo_config_file("common/models/mask_rcnn_fpn.py")).model
    for key in ("mask_in_features", "mask_pooler", "mask_head"):
        del detector.roi_heads[key]
    detector.backbone.bottom_up.stages.depth = depth
    detector.backbone.bottom_up.freeze_at = 2  # MODEL.BACKBONE.FREEZE_AT of the yaml (detectron2's default)
    return detector


model = L(distill_detector)(
    student=faster_rcnn_fpn(50),
    # The teacher: detectron2's model-zoo faster_rcnn_R_101_FPN_3x (BGR, MSRA normalisation); its
    # weights are the teacher.* keys of train.init_checkpoint unless `weights` names a file.
    teacher=L(teacher_from)(model=faster_rcnn_fpn(101), weights="", student_weights="${train.init_checkpoint}"),
    parts=[L(part)(name="logits", TYPE="DKD", ALPHA=1.0, BETA=0.25, TEMPERATURE=1.0)],
)

dataloader = LazyConfig.load(model_zoo_config_file("common/data/coco.py")).dataloader
dataloader.train.mapper.use_instance_mask = False
dataloader.evaluator.tasks = ("bbox",)

optimizer = L(SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)
lr_multiplier = L(multistep_lr)(steps=[60000, 80000], max_iter="${train.max_iter}", warmup_iters=1000)

train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    amp=dict(enabled=False, dtype="fp16"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device="cuda",
    seed=-1,
)

deepkd = deepkd_settings_dict()
