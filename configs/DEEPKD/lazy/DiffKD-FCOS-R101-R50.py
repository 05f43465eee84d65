# DiffKD's Table 4 FCOS pair: FCOS R-101 (teacher, 40.8 AP) -> FCOS R-50 (student, 38.5 AP; DiffKD
# 42.4 AP), DiffKD on the FPN levels P3-P7. Everything else is detectron2's own
# COCO-Detection/fcos_R_50_FPN_1x.py (detectron2 after v0.6: v0.6's FCOSHead puts GN on its
# 1-channel centerness layer and fails to build): data, SGD lr 0.01, the 1x schedule, ImageNet R-50
# init. Teacher weights: an FCOS R-101 detectron2 checkpoint in pretrained/fcos-r101.pth. DeepKD
# stays off: it needs a logit part (the dense logit part is written for RetinaNet's head).
import copy

from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from deepkd_det.core.settings import deepkd_settings_dict
from deepkd_det.det.config import model_zoo_config_file
from deepkd_det.det.distill.lazy import distill_detector, part, teacher_from

_zoo = LazyConfig.load(model_zoo_config_file("COCO-Detection/fcos_R_50_FPN_1x.py"))
dataloader, optimizer, lr_multiplier, train = _zoo.dataloader, _zoo.optimizer, _zoo.lr_multiplier, _zoo.train

_teacher = copy.deepcopy(_zoo.model)
_teacher.backbone.bottom_up.stages.depth = 101

model = L(distill_detector)(
    student=_zoo.model,
    teacher=L(teacher_from)(model=_teacher, weights="pretrained/fcos-r101.pth", input_format="BGR"),
    parts=[L(part)(name="diffkd", DIFFKD=dict(ENABLED=True, IN_FEATURES=["p3", "p4", "p5", "p6", "p7"]))],
    input_format="BGR",  # FCOS states no channel order: detectron2's COCO loader gives BGR
)

train.output_dir = "output/DEEPKD/lazy/DiffKD-FCOS-R101-R50"
train.seed = -1
deepkd = deepkd_settings_dict()
