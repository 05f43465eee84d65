"""The ReviewKD release's head keys in our layout.

Our review head (``deepkd_det.core.reviewkd.ReviewKDHead``, built by the ReviewKD part,
deepkd_det/det/distill/parts/reviewkd.py) has state-dict keys ``reviewkd_head.*``; the release's
combined files name it ``kd_trans.*``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

__all__ = [
    "REVIEWKD_HEAD_PREFIX",
    "RELEASE_HEAD_PREFIX",
    "release_head_keys_to_ours",
]

# Name of the ReviewKD part's module on the wrapper, hence the prefix of its state-dict keys.
REVIEWKD_HEAD_PREFIX = "reviewkd_head."
# The ReviewKD release (dvlab-research/ReviewKD Detection/, mdistiller detection/) names its head
# ``kd_trans``: ``kd_trans.abfs.<j>.{conv1,conv2,att_conv}.*``, where ``abfs`` was reversed after
# construction, so ``j = 0`` is the coarsest level (ours: ``abfs.<i>``, ``i = 0`` the finest).
RELEASE_HEAD_PREFIX = "kd_trans."
_RELEASE_HEAD_KEY = re.compile(r"^kd_trans\.abfs\.(\d+)\.(conv1|conv2|att_conv)\.(.+)$")
_RELEASE_PARTS = {"conv1": "lateral", "conv2": "output", "att_conv": "attention"}


def release_head_keys_to_ours(state: Mapping) -> Mapping:
    """Rename the release's ``kd_trans.*`` head keys to ``reviewkd_head.*`` (levels reversed,
    ``conv1`` / ``conv2`` / ``att_conv`` -> ``lateral`` / ``output`` / ``attention``); a state
    without them is returned as it is. A key of another shape, or both spellings in one file,
    raise ValueError."""
    release = [k for k in state if k.startswith(RELEASE_HEAD_PREFIX)]
    if not release:
        return state
    if any(k.startswith(REVIEWKD_HEAD_PREFIX) for k in state):
        raise ValueError(f"the checkpoint holds both {RELEASE_HEAD_PREFIX}* and {REVIEWKD_HEAD_PREFIX}* head keys")
    bad = [k for k in release if not _RELEASE_HEAD_KEY.match(k)]
    if bad:
        raise ValueError(f"unexpected ReviewKD release head keys: {bad[:10]}")
    levels = sorted({int(_RELEASE_HEAD_KEY.match(k)[1]) for k in release})
    if levels != list(range(len(levels))):
        raise ValueError(f"ReviewKD release head levels {levels} are not 0..{len(levels) - 1}")
    out = OrderedDict()
    for k, v in state.items():
        m = _RELEASE_HEAD_KEY.match(k)
        if m is None:
            out[k] = v
        else:
            level = len(levels) - 1 - int(m[1])
            out[f"{REVIEWKD_HEAD_PREFIX}abfs.{level}.{_RELEASE_PARTS[m[2]]}.{m[3]}"] = v
    return out
