#!/usr/bin/env python
"""Export a distilled student (detection or classification) for deployment (docs/deploy.md).

    python tools/export_student.py --run output/demo/student-deepkd-dkd
    python tools/export_student.py --config-file configs/DEEPKD/DKD-R18-R101.yaml --weights model_final.pth
    python tools/export_student.py --run output/cls/digits/<experiment>          # classification
    python tools/export_student.py --config-file configs/cls/digits/gpd.yaml --weights .../latest.pth

``--run DIR``: a training run's folder (its config.yaml; detection: the checkpoint named by
last_checkpoint, classification: latest.pth). The task is read from the config. The folder
written (``--output``, default ``<run or weights folder>/export``) holds the student's weights
only, a config stock detectron2 accepts (detection), TorchScript, ONNX (opset 17; needs the
optional extra ``pip install -e '.[export]'``; ``--formats torchscript`` leaves it out) and
deploy.json (input format, normalisation, size rules, class names, parity figures).

The export checks itself on a sample image (detection: ``--sample IMAGE``, else a generated one):
the project's evaluation model vs the plain one, TorchScript and, where onnxruntime is
installed, ONNX; it prints the largest differences and exits 1 (files kept) when one is past its
tolerance. Bad input: one line, exit 1 (``--debug`` or DEEPKD_DEBUG=1: the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from anywhere: the project's package next to this folder
    sys.path.insert(0, REPO)

from deepkd_det.cli import DEBUG_ENV, debug_requested, pull_trailing_flags, run_cli  # noqa: E402
from deepkd_det.core import deploy as ex  # noqa: E402

FORMATS = ("torchscript", "onnx")
USER_ERRORS = (ValueError, KeyError, OSError, ex.ExportExtraMissing)
# Top-level keys only one of the two config systems has.
DETECTION_KEYS = {"MODEL", "INPUT", "DATASETS", "DATALOADER"}
CLASSIFICATION_KEYS = {"DISTILLER", "DATASET", "GPD"}


def detect_task(path: str) -> str:
    """"det" or "cls", from the top-level keys of ``path`` and its _BASE_ chain."""
    keys, seen = set(), set()
    while path and path not in seen:
        seen.add(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not a yaml file ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a config (a yaml mapping)")
        keys |= set(data)
        base = data.get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if isinstance(base, str) and not os.path.isabs(base) else base
    if keys & CLASSIFICATION_KEYS:
        return "cls"
    if keys & DETECTION_KEYS or "KD" in keys:
        return "det"
    raise ValueError(f"cannot tell the task of {path!r}: neither a detection config (MODEL, INPUT, ...) "
                     "nor a classification one (DISTILLER, DATASET)")


def _run_files(run: str, task: str):
    if task == "det":
        tag = os.path.join(run, "last_checkpoint")
        name = open(tag).read().strip() if os.path.isfile(tag) else "model_final.pth"
    else:
        name = "latest.pth"
    weights = os.path.join(run, name)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--run {run!r} holds no {name} (give the checkpoint with --weights)")
    return weights


def _det_cfg(config_file: str, opts):
    from detectron2.config import get_cfg

    from deepkd_det.cli import format_error
    from deepkd_det.det.config import add_deepkd_config, merge_config_file
    from deepkd_det.det.data import add_data_config, register_datasets_from_cfg, resolve_num_classes

    cfg = get_cfg()
    add_deepkd_config(cfg)
    add_data_config(cfg)
    try:
        merge_config_file(cfg, config_file)
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError) as exc:
        raise ValueError(f"{config_file}: {format_error(exc)}") from None
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES == 0:  # the class count comes from the dataset json
        register_datasets_from_cfg(cfg)
        resolve_num_classes(cfg)
    cfg.freeze()
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a training run's output folder (config.yaml and checkpoints)")
    parser.add_argument("--config-file", help="the student's config (detection or classification yaml)")
    parser.add_argument("--weights", help="the checkpoint to export (default with --run: the run's last)")
    parser.add_argument("--output", help="folder to write (default: <run or weights folder>/export)")
    parser.add_argument("--formats", default="torchscript,onnx",
                        help="comma-separated subset of torchscript,onnx (default both; weights, config "
                             "and deploy.json are always written)")
    parser.add_argument("--sample", help="detection: an image file for the parity check (default: a generated one)")
    parser.add_argument("--debug", action="store_true", help=f"full tracebacks (also {DEBUG_ENV}=1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    debug = args.debug or debug_requested(argv)
    return run_cli(lambda: _export(args), "export_student.py", USER_ERRORS, debug=debug)


def _export(args) -> None:
    # torch 2.14 marks torch.jit as deprecated on every call; TorchScript is still what it writes.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # detectron2's anchors, every call
    opts, _ = pull_trailing_flags(args.opts or [], ("--debug",))
    if bool(args.run) == bool(args.config_file):
        raise ValueError("give exactly one of --run DIR or --config-file FILE (with --weights)")
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"--formats: unknown {unknown}; choose from {list(FORMATS)}")
    if args.run and not os.path.isdir(args.run):
        raise FileNotFoundError(f"--run {args.run!r} is not a folder")
    config_file = os.path.join(args.run, "config.yaml") if args.run else args.config_file
    if args.run and not os.path.isfile(config_file):
        raise FileNotFoundError(f"--run {args.run!r} holds no config.yaml (not a training run's output folder?)")
    task = detect_task(config_file)
    weights = args.weights or (_run_files(args.run, task) if args.run else None)
    if not weights:
        raise ValueError("--config-file needs --weights (the checkpoint to export)")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights!r} does not exist")
    out_dir = args.output or os.path.join(args.run or os.path.dirname(os.path.abspath(weights)), "export")
    if "onnx" in formats:
        ex.require_onnx()

    if task == "det":
        from deepkd_det.det.export import export_detector

        info = export_detector(_det_cfg(config_file, opts), weights, out_dir, formats, sample=args.sample)
    else:
        if args.sample:
            raise ValueError("--sample is for detection; a classifier is checked on its validation images")
        from deepkd_det.cls.config import load_cfg
        from deepkd_det.cls.export import export_classifier

        info = export_classifier(load_cfg(config_file, opts), weights, out_dir, formats)
    figures = info["parity"]["figures"]
    failures = ex.parity_failures(figures)
    info["parity"]["ok"] = not failures
    ex.write_json(os.path.join(out_dir, "deploy.json"), info)
    _print_summary(out_dir, info)
    if failures:
        raise ValueError(f"parity check failed: {'; '.join(failures)} (the files are kept in {out_dir}; "
                         "deploy.json holds every figure)")


def _print_summary(out_dir: str, info) -> None:
    sizes = info["sizes_mb"]
    files = ", ".join(f"{name} {sizes[key]:.1f} MB" if sizes[key] >= 0.1 else name
                      for key, name in info["files"].items())
    print(f"[export] {info['task']} student -> {out_dir}: {files}, deploy.json "
          f"(source checkpoint {sizes['source_checkpoint']:.1f} MB)")
    parity = info["parity"]
    print(f"[export] parity on {parity['sample']}" + (f" ({parity['detections']} detections)" if "detections" in parity else "")
          + ": largest difference per output (abs / rel)")
    for check, fig in parity["figures"].items():
        print(f"[export]   {check:28s} " + "  ".join(f"{k} {v['abs']:.3g} / {v['rel']:.3g}" for k, v in fig.items()))
    if parity.get("detections") == 0:
        print("[export]   note: no detection above MODEL.ROI_HEADS.SCORE_THRESH_TEST on the sample, so the "
              "check compared empty outputs: give --sample an image of your data")
    if parity.get("onnx_note"):
        print(f"[export]   ONNX: {parity['onnx_note']}")


if __name__ == "__main__":
    sys.exit(main())
