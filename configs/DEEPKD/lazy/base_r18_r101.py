# LazyConfig twin of ../Base-R18-R101.yaml: teacher R-101 (detectron2 model zoo 3x, 42.04 AP) ->
# student R-18 (torchvision ImageNet: RGB input, torchvision normalisation).
# train.init_checkpoint: tools/make_kd_weights.py --teacher faster_rcnn_R_101_FPN_3x.pkl
#   --student <torchvision resnet18 .pth> --student-arch R-18 --output pretrained/r18-r101.pth
from .base_rcnn_fpn import dataloader, deepkd, lr_multiplier, model, optimizer, train  # noqa: F401

model.student.backbone.bottom_up.stages.depth = 18
del model.student.backbone.bottom_up.stages["stride_in_1x1"]  # basic blocks have no 1x1 conv
model.student.pixel_mean = [123.675, 116.28, 103.53]
model.student.pixel_std = [58.395, 57.12, 57.375]
model.student.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
train.init_checkpoint = "pretrained/r18-r101.pth"
