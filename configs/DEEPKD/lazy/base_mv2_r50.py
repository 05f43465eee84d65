# LazyConfig twin of ../Base-MV2-R50.yaml: teacher R-50 (detectron2 model zoo
# faster_rcnn_R_50_FPN_3x) -> student MobileNetV2-FPN (torchvision ImageNet: RGB input,
# torchvision normalisation; P2-P5 from m2-m5, P6 by max pooling).
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from deepkd_det.det.modeling.mobilenetv2_fpn import MobileNetV2Backbone

from .base_rcnn_fpn import dataloader, deepkd, faster_rcnn_fpn, lr_multiplier, model, optimizer, train  # noqa: F401

model.student.backbone = L(FPN)(
    bottom_up=L(MobileNetV2Backbone)(out_features=["m2", "m3", "m4", "m5"], norm="FrozenBN", freeze_at=0),
    in_features=["m2", "m3", "m4", "m5"],
    out_channels=256,
    top_block=L(LastLevelMaxPool)(),
)
model.student.pixel_mean = [123.675, 116.28, 103.53]
model.student.pixel_std = [58.395, 57.12, 57.375]
model.student.input_format = "RGB"
model.teacher.model = faster_rcnn_fpn(50)
dataloader.train.mapper.image_format = "RGB"
train.init_checkpoint = "pretrained/mv2-r50.pth"
