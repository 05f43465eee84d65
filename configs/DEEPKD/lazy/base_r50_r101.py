# LazyConfig twin of ../Base-R50-R101.yaml: teacher R-101 -> student R-50 (MSRA ImageNet, BGR).
from .base_rcnn_fpn import dataloader, deepkd, lr_multiplier, model, optimizer, train  # noqa: F401

train.init_checkpoint = "pretrained/r50-r101.pth"
