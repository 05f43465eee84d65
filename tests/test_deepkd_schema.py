"""One DeepKD settings node for both tasks: the same keys, defaults, meanings and validation."""

from __future__ import annotations

import pytest

pytest.importorskip("detectron2")

from deepkd_det.cls.config import ConfigError  # noqa: E402
from deepkd_det.cls.config import get_cfg as get_cls_cfg  # noqa: E402
from deepkd_det.cls.config import validate_cfg as validate_cls  # noqa: E402
from deepkd_det.core.settings import DEEPKD_DEFAULTS  # noqa: E402
from deepkd_det.det.config import get_deepkd_cfg, validate_deepkd_config  # noqa: E402
from tests.det.tiny import get_tiny_cfg  # noqa: E402


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_both_tasks_mount_the_same_node_with_the_same_defaults():
    det, cls = _flat(get_deepkd_cfg().DEEPKD), _flat(get_cls_cfg().DEEPKD)
    assert det == cls == _flat(DEEPKD_DEFAULTS)
    assert set(det) >= {"ENABLED", "DECOUPLE", "OPTIMIZER", "COMPAT", "DELTA_TOG", "DELTA_TCG", "DELTA_NCG",
                        "DOT_DELTA", "DAMPENING", "GRAD_STRATEGY", "TOPK.MODE", "TOPK.K_START", "TOPK.RANK",
                        "GSNR.PERIOD"}
    # Both use SOLVER.MOMENTUM as the base of every buffer's momentum.
    assert "MOMENTUM" in get_deepkd_cfg().SOLVER and "MOMENTUM" in get_cls_cfg().SOLVER


# (DEEPKD overrides, fragment of the message both tasks must give); 9 non-target classes in both
BAD = [
    ({"OPTIMIZER": "adam"}, "DEEPKD.OPTIMIZER must be one of ('deepkd', 'dot')"),
    ({"COMPAT": "reference"}, "DEEPKD.COMPAT must be one of ('paper', 'official')"),
    ({"GRAD_STRATEGY": "magic"}, "DEEPKD.GRAD_STRATEGY must be one of"),
    ({"DAMPENING": 1.0}, "DEEPKD.DAMPENING must lie in [0, 1)"),
    ({"DELTA_TOG": 0.1}, "TOG momentum SOLVER.MOMENTUM + DEEPKD.DELTA_TOG = 0.9 + 0.1 = 1 is outside [0, 1)"),
    ({"DELTA_TCG": -0.95}, "TCG momentum SOLVER.MOMENTUM + DEEPKD.DELTA_TCG"),
    ({"OPTIMIZER": "dot", "DOT_DELTA": 0.2}, "DOT distillation momentum"),
    ({"TOPK.MODE": "cosine"}, "DEEPKD.TOPK.MODE must be one of"),
    ({"TOPK.RANK": "target"}, "DEEPKD.TOPK.RANK must be one of ('auto', 'nontarget', 'all')"),
    ({"TOPK.K_START": 12}, "DEEPKD.TOPK.K_START=12 is out of range: K must lie in [1, C-1] = [1, 9]"),
    ({"TOPK.K_START": 5, "TOPK.K_END": 3}, "k_start=5 > k_end=3"),
    ({"TOPK.MODE": "step", "TOPK.PHASES": [[0.5, 2], [0.3, 3]]}, "strictly increasing"),
    ({"GSNR.WINDOW": 1}, "DEEPKD.GSNR.WINDOW must be >= 2"),
    ({"GSNR.PERIOD": 3, "GSNR.WINDOW": 4}, "DEEPKD.GSNR.PERIOD (3) must be 0 or >= DEEPKD.GSNR.WINDOW (4)"),
]


def _set(node, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def _det_error(overrides):
    cfg = get_tiny_cfg(num_classes=9, kd_type="DKD", deepkd=True)
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.DEEPKD.TOPK.MODE = DEEPKD_DEFAULTS["TOPK"]["MODE"]  # the tiny test config turns the mask off
    for k, v in overrides.items():
        _set(cfg.DEEPKD, k, v)
    with pytest.raises(ValueError) as info:
        validate_deepkd_config(cfg)
    return str(info.value)


def _cls_error(overrides):
    cfg = get_cls_cfg()  # digits: 10 classes, 9 non-target
    cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER = "DKD", "resnet8"
    cfg.DEEPKD.ENABLED = True
    cfg.SOLVER.MOMENTUM = 0.9
    for k, v in overrides.items():
        _set(cfg.DEEPKD, k, v)
    with pytest.raises(ConfigError) as info:
        validate_cls(cfg)
    return str(info.value)


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_both_tasks_refuse_the_same_settings_with_the_same_message(overrides, message):
    assert message in _det_error(overrides)
    assert message in _cls_error(overrides)


def test_defaults_are_valid_in_both_tasks():
    validate_deepkd_config(get_tiny_cfg(num_classes=9, kd_type="DKD", deepkd=True))
    cfg = get_cls_cfg()
    cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DEEPKD.ENABLED = "DKD", "resnet8", True
    validate_cls(cfg)
