"""Semantic segmentation on the shared core: DeepLabV3 / PSPNet, per-pixel KD / DKD / DeepKD, DiffKD
on the predicted maps, mIoU (docs/segmentation.md). Pure torch + torchvision; never imports
detectron2 or the other adapters."""
