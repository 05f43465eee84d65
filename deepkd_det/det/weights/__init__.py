"""Every weight file of the detector side, in one place.

- ``layouts``: reading checkpoints (detectron2 ``.pkl`` / ``.pth``, release files), the key
  layouts (ImageNet students, MobileNetV2, the teacher prefix), which teacher modules a file may
  leave out;
- ``teacher``: the teacher's weights (TEACHER.MODEL.WEIGHTS or a combined file), checked completely;
- ``checkpoint``: ``DeepKDCheckpointer`` (training, resume, the student part of combined files)
  and ``EvalCheckpointer`` (evaluation / export: the file must fill the whole student);
- ``report``: the one mismatch report all three use.

The training-only modules (the parts' own, e.g. ``reviewkd_head.*``, ``diffkd.*``) are derived
from the distillation parts (deepkd_det/det/distill/parts/base.py ``training_only_modules``).
"""
