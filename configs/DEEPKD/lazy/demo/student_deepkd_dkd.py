# LazyConfig twin of ../../demo/student-deepkd-dkd.yaml: DeepKD on DKD (decoupled momentum buffers,
# optimizer.momentum 0.8 + 0.075 / -0.075 / +0.05, and the dynamic top-k mask from K = 2).
from .student_dkd import dataloader, datasets, deepkd, lr_multiplier, model, optimizer, train  # noqa: F401

deepkd.ENABLED = True
deepkd.TOPK.K_START = 2
train.output_dir = "output/demo-lazy/student-deepkd-dkd"
