#!/usr/bin/env python
"""Plot the TOG / TCG / NCG gradient and momentum-buffer signal-to-noise ratios of a run.

    python tools/plot_gsnr.py --run output/cls/digits/deepkd_dkd_resnet20_resnet8 [--out gsnr.png]

Reads ``<run>/metrics.jsonl`` (``{"type": "gsnr", ...}`` rows), or, if absent, the TensorBoard
event files under ``<run>/tb``. Writes a PNG with GSNR (left) and BSNR (right) against iteration.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

Series = Dict[str, List[Tuple[int, float]]]
COMPONENTS = ("tog", "tcg", "ncg")


def read_jsonl(path: str) -> Series:
    series: Series = defaultdict(list)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if row.get("type") != "gsnr":
                continue
            for key, value in row.items():
                if key.startswith(("gsnr/", "bsnr/")) and isinstance(value, (int, float)):
                    series[key].append((int(row["iter"]), float(value)))
    return series


def read_tensorboard(run_dir: str) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Series = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(("gsnr/", "bsnr/")):
                series[tag].extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def load_series(run_dir: str) -> Series:
    jsonl = os.path.join(run_dir, "metrics.jsonl")
    series = read_jsonl(jsonl) if os.path.isfile(jsonl) else {}
    if not series:
        series = read_tensorboard(run_dir)
    return series


def plot(series: Series, out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("gsnr", "bsnr")):
        for comp in COMPONENTS:
            points = sorted(series.get(f"{kind}/{comp}", []))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=comp.upper(), marker=".")
        ax.set_xlabel("iteration")
        ax.set_ylabel(kind.upper() + " (mean over elements)")
        ax.set_yscale("log")
        ax.set_title({"gsnr": "gradient SNR", "bsnr": "momentum-buffer SNR"}[kind])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run output directory")
    parser.add_argument("--out", help="PNG path (default <run>/gsnr.png)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        print(f"plot_gsnr.py: error: no run directory {args.run}", file=sys.stderr)
        return 1
    series = load_series(args.run)
    if not any(series.get(f"gsnr/{c}") for c in COMPONENTS):
        print(f"plot_gsnr.py: error: no GSNR measurements in {args.run} (train with GSNR.ENABLED True)",
              file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.run, "gsnr.png")
    plot(series, out, title=os.path.basename(os.path.normpath(args.run)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
