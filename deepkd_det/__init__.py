"""DeepKD-Det: DeepKD knowledge distillation as a Detectron2 extension, plus classification.

``deepkd_det.core`` (the maths, pure torch) imports without detectron2; the detection parts
(``deepkd_det.det.config``, ``modeling``, ``engine``, ``data``) need detectron2.
"""

__version__ = "0.1.0"
