"""Files, shared by both tasks: atomic writes and weights-only reads of checkpoints, config
yamls read with one-line errors, the output folder checked at start-up (pure Python + torch,
no detectron2).

A file goes to a temporary file in the target directory, is flushed to disk and renamed over
the target with ``os.replace`` (atomic on POSIX and Windows), so a killed run leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Callable, Optional

import torch

__all__ = ["atomic_write", "atomic_save", "atomic_write_json", "check_output_dir", "load_weights_only", "read_yaml_mapping",
           "remove_leftover_temp_files"]

# atomic_write's temporary files: "." + target name + "." + mkstemp's 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, rename it to ``path``.

    On any exception (or interrupt) the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; keep the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write(path, lambda f: json.dump(data, f), mode="w")


def load_weights_only(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: a checkpoint is untrusted input.

    A missing file raises FileNotFoundError, a file that is not a weights-only torch file
    (arbitrary pickled objects, a truncated or foreign file) ValueError; both name the path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (b"PK") or, in its legacy format, a pickle (protocol >= 2: 0x80).
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise ValueError(
            f"cannot read checkpoint {path}: it is not a torch file (a torch checkpoint is a zip archive or a "
            f"pickle; this file starts with {head!r})"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file: one message naming it
        detail = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0]}" if str(exc).strip() else "")
        if head.startswith(b"PK") and isinstance(exc, RuntimeError):
            raise ValueError(f"cannot read checkpoint {path}: the torch file is damaged (truncated or corrupt "
                             f"zip archive, e.g. copied while it was written). Details: {detail}") from None
        raise ValueError(
            f"cannot read checkpoint {path} as a weights-only torch file (torch.load(weights_only=True)): it is "
            "not a torch file, or it holds Python objects other than tensors. If it is a checkpoint from a source "
            f"you trust, convert it once into a weights-only file (tools/make_kd_weights.py). Details: {detail}"
        ) from None


def remove_leftover_temp_files(directory: str) -> list:
    """Remove the temporary files of ``atomic_write`` that a killed process left in ``directory``
    (a kill -9 during a save skips the clean-up); returns their names. Call it at start-up, when
    no other process writes to ``directory``."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _TEMP_NAME.match(name) and os.path.isfile(path):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(name)
    return removed


def check_output_dir(path: str, key: str = "OUTPUT_DIR") -> None:
    """``path`` is a folder, or can be made one: a ValueError names ``key`` where it, or a folder
    above it, is an existing file (a check at start-up, before anything is written)."""
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe):
            if not os.path.isdir(probe):
                where = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe!r}"
                raise ValueError(f"{key} {path!r} {where}, not a folder: choose another {key}")
            return
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent


def read_yaml_mapping(path: str, python_tags_ok: bool = False) -> Optional[dict]:
    """The mapping a config yaml holds (``{}`` for an empty file). A file that is not valid YAML
    (its line and column named) or whose top level is not a mapping is a ValueError naming it.
    ``python_tags_ok``: a file with ``!!python`` tags gives None (left to a loader that reads them)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.constructor.ConstructorError:
        if python_tags_ok:
            return None
        raise ValueError(f"{path}: holds a YAML tag a config cannot use (e.g. !!python)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ValueError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of KEY: value, its top level is a "
                         f"{type(data).__name__}")
    return data
