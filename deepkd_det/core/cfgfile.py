"""yacs configuration files shared by the pure-torch trainers (classification, segmentation).

``merge_file`` merges a yaml file into a yacs ``CfgNode`` (following its ``_BASE_`` chain, paths
relative to the file); ``merge_opts`` merges ``KEY VALUE`` command-line overrides (values parsed as
yaml literals). Unknown keys (with a "did you mean" hint), a value where a section is expected and
numbers yaml reads as strings are one :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Iterable, Mapping, Sequence

import yaml
from yacs.config import CfgNode as CN

from .io import read_yaml_mapping

__all__ = ["ConfigError", "flatten", "merge_dict", "merge_file", "merge_opts"]


class ConfigError(ValueError):
    """A configuration that cannot be run (unknown key, wrong type, contradictory settings)."""


def flatten(node: Mapping, prefix: str = "") -> Dict[str, Any]:
    """``{dotted.key: value}`` of a nested mapping (a config node, a yaml dict)."""
    out: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _suggest(key: str, node: CN, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _coerce_numbers(new: dict, ref: CN, where: str, prefix: str = "") -> dict:
    """Check keys against the defaults and accept ints where floats are expected (yaml ``8`` for 8.0)."""
    out = {}
    for key, value in new.items():
        full = prefix + key
        if key not in ref:
            raise ConfigError(f"{where}: unknown config key {full}{_suggest(key, ref, prefix)}")
        default = ref[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full} is a section; got the value {value!r}")
            value = _coerce_numbers(value, default, where, full + ".")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, str) and isinstance(value, bool):
            value = "on" if value else "off"  # yaml 1.1 reads a bare off/on as a bool
        elif isinstance(default, float) and isinstance(value, str):
            # yaml 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: {full} must be a number, got {value!r}") from None
        out[key] = value
    return out


def merge_dict(cfg: CN, data: dict, where: str, prefix: str = "") -> None:
    """Merge a nested dict into ``cfg`` (keys checked against it; ``where`` names the source,
    ``prefix`` is put before the keys in the messages, e.g. ``"deepkd."``)."""
    data = _coerce_numbers(data, cfg, where, prefix)
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def merge_file(cfg: CN, path: str, chain: Sequence[str] = ()) -> None:
    """Merge the yaml file ``path`` (after its ``_BASE_`` chain) into ``cfg``."""
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"_BASE_ cycle: {' -> '.join(list(chain) + [path])}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        data = read_yaml_mapping(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base = data.pop("_BASE_", None)
    if base:
        merge_file(cfg, os.path.join(os.path.dirname(path), base), list(chain) + [path])
    merge_dict(cfg, data, path)


def merge_opts(cfg: CN, opts: Iterable[str]) -> None:
    """Merge ``["KEY", "VALUE", ...]`` command-line overrides (values parsed as yaml literals)."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"overrides must come in KEY VALUE pairs, got {len(opts)} items: {opts}")
    for key, raw in zip(opts[0::2], opts[1::2]):
        value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        nested: dict = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        merge_dict(cfg, nested, "command line")
