# LazyConfig twin of ../../demo/student-dkd.yaml: the demo student (shapes.py's detector) with plain
# DKD from the demo teacher (the same architecture; its weights from shapes.py's run). Same
# schedule, lr and momentum as the yaml.
from detectron2.config import LazyCall as L

from deepkd_det.det.distill.lazy import distill_detector, part, teacher_from

from .shapes import dataloader, datasets, deepkd, lr_multiplier, optimizer, train  # noqa: F401
from .shapes import model as detector

model = L(distill_detector)(
    student=detector,
    teacher=L(teacher_from)(
        model=detector,
        weights="output/demo-lazy/teacher/model_final.pth",
        student_weights="${train.init_checkpoint}",
    ),
    # KD.TYPE / KD.WARMUP_ITERS of the yaml: from-scratch students diverge when the distillation
    # terms hit at full weight at once.
    parts=[L(part)(name="logits", TYPE="DKD", WARMUP_ITERS=20)],
)

optimizer.lr = 0.01
optimizer.momentum = 0.8
lr_multiplier.steps = [80]
train.max_iter = 100
train.output_dir = "output/demo-lazy/student-dkd"
