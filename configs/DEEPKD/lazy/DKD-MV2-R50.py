# LazyConfig twin of ../DKD-MV2-R50.yaml: DeepKD on DKD, pair MV2-R50: three momentum buffers (TOG / TCG /
# NCG with optimizer.momentum + 0.075 / -0.075 / +0.05) and the dynamic top-k mask on NCKD (K from
# 10% of the 80 non-target classes to all of them at 60% of training).
#   python tools/lazy_train_net.py --config-file configs/DEEPKD/lazy/DKD-MV2-R50.py --num-gpus 8
from .base_mv2_r50 import dataloader, deepkd, lr_multiplier, model, optimizer, train  # noqa: F401

deepkd.ENABLED = True
train.output_dir = "output/DEEPKD/lazy/DKD-MV2-R50"
