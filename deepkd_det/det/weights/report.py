"""One mismatch report for every weight check: the teacher's, the student's and the evaluated model's.

``mismatch_problems`` compares what a model holds with what a file gives and names, in one line
each, the keys missing from the file, the keys the model does not have, and the shape
mismatches (at most ``limit`` names each, then a count).
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Mapping, Optional, Sequence

__all__ = ["mismatch_problems", "name_keys"]


def name_keys(keys: Sequence[str], limit: int = 10) -> str:
    """``a, b, c`` or ``a, b, ... and N more``."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def mismatch_problems(
    own: Mapping[str, object],
    given: Mapping[str, object],
    *,
    what: str = "",
    scope: Optional[Callable[[str], bool]] = None,
    may_be_missing: Iterable[str] = (),
    missing_note: str = "",
    limit: int = 10,
) -> List[str]:
    """The problems of loading ``given`` (file keys -> tensors or shapes) into ``own`` (model keys
    -> tensors or shapes), one line each: missing keys, unexpected keys, shape mismatches.

    ``what``: how the keys are called in the lines ("teacher", "student backbone");
    ``scope``: only keys it accepts are compared (e.g. the backbone's); ``may_be_missing``: model
    keys a file may lack (running statistics folded into a legacy file's weights, modules no part
    runs); ``missing_note``: appended to the missing line (what would happen to them).
    """
    def inside(k: str) -> bool:
        return scope is None or scope(k)

    allowed = set(may_be_missing)
    label = f"{what} keys" if what else "keys"
    missing = sorted(k for k in own if inside(k) and k not in given and k not in allowed)
    unexpected = sorted(k for k in given if inside(k) and k not in own)
    shapes = sorted(
        f"{k}: file {_shape(given[k])} vs model {_shape(own[k])}"
        for k in own if inside(k) and k in given and _shape(given[k]) != _shape(own[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} {label} missing from the file{missing_note}: {name_keys(missing, limit)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {label} (not in the model): {name_keys(unexpected, limit)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {name_keys(shapes, limit)}")
    return problems
