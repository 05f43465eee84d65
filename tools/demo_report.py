"""The demos' report: mean ± std over seeds, whether a difference exceeds the spread, the picture.

Both demos (tools/det_demo.py, tools/cls_demo.py) report each method as the mean ± sample
standard deviation over its seeds and call a difference between two methods real only when it
exceeds the spread, ``|mean_a - mean_b| > std_a + std_b``: a conservative rule for three seeds,
not a significance test. Plain Python (matplotlib, imported when a picture is drawn); no torch.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["DOC_FILES", "InlinePool", "add_demo_arguments", "docs_block_markers", "docs_targets", "publish_to_docs", "write_docs_block", "compare", "demo_methods_and_seeds", "demo_pool", "fmt_mean_std", "mean_std", "picture_table", "plot_report", "seed_band", "verdict"]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def compare(a: Sequence[float], b: Sequence[float]) -> Dict:
    """Mean difference a - b and whether it exceeds the spread (|difference| > std_a + std_b)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    return {"diff": diff, "spread": sa + sb, "exceeds": abs(diff) > sa + sb}


def verdict(c: Dict) -> str:
    """A table cell for ``compare``'s result (markdown bold where the difference exceeds the spread)."""
    if not c["exceeds"]:
        return f"{c['diff']:+.2f} (within ±{c['spread']:.2f})"
    return f"**{c['diff']:+.2f}** ({'above' if c['diff'] > 0 else 'below'}, spread {c['spread']:.2f})"


def seed_band(runs: List[Dict[str, list]], key: str):
    """``x, mean, std`` over the seeds of one curve (``run[key]``: ``[(x, value), ...]``), at the x
    every seed has."""
    per_seed = [dict(r.get(key, [])) for r in runs]
    xs = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    values = [[p[x] for p in per_seed] for x in xs]
    return xs, [statistics.fmean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def demo_pool(jobs: int):
    """Where a demo's runs train: ``jobs`` worker processes (spawned, so each run starts from a
    fresh interpreter), or, for ``jobs <= 1``, an ``InlinePool`` in this process."""
    if jobs <= 1:
        return InlinePool()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))


class InlinePool:
    """A stand-in for a process pool when one job at a time is wanted: runs each job when submitted."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args):
        return self._Done(fn(*args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def picture_table(results: Dict, comparisons: Dict, labels: Dict[str, str], plain_of: Dict[str, str],
                  metric: str, title: str) -> List[str]:
    """The demo table as fixed-width lines for the picture ("*": the difference exceeds the spread).

    ``results[key]``: ``{"label", metric: [finished seeds' values], "per_seed": [cell, ...]}`` (a
    missing "per_seed" shows ``metric``'s values); ``comparisons["<key> - <other>"]``: ``compare``.
    """
    def cell(name):
        c = comparisons.get(name)
        return "-" if c is None else f"{c['diff']:+.2f}{' *' if c['exceeds'] else '  '} (spread {c['spread']:.2f})"

    w = max([13] + [len(r["label"]) + 1 for r in results.values()])
    lines = [f"{'method':<{w}} {title:>16}   {'vs vanilla':<22} {'vs plain':<34} per seed"]
    for key, r in results.items():
        plain = plain_of.get(key)
        vs_plain = f"{cell(f'{key} - {plain}')} vs {labels[plain]}" if f"{key} - {plain}" in comparisons else "-"
        value = fmt_mean_std(r[metric]) if r[metric] else "-"
        per_seed = r.get("per_seed") or [f"{v:.2f}" for v in r[metric]]
        lines.append(f"{r['label']:<{w}} {value:>16}   {cell(f'{key} - vanilla'):<22} {vs_plain:<34} " + ", ".join(per_seed))
    lines.append("* = |mean difference| > std_a + std_b (beyond the seed spread)")
    return lines


def plot_report(results: Dict, curves: Dict[str, List[Dict[str, list]]], path: str, *, metric: str, curve: str,
                k_curve: str, teacher: float, unit: str, x_label: str, note: str, table: List[str],
                k_keys: Optional[Sequence[str]] = None, val_ylim: Optional[Tuple[float, float]] = None) -> None:
    """The demo picture (PNG): validation curves with seed bands, each seed's final value, the top-k
    schedule K, the GSNR and BSNR of TOG/TCG/NCG (the paper's Figure 2 form), a note and the table.

    ``results[key][metric]``: the finished seeds' final values; ``curves[key]``: one dict per
    finished seed of ``[(x, value), ...]`` under ``curve`` (validation), ``k_curve`` (K) and
    ``gsnr/<c>`` / ``bsnr/<c>``; ``k_keys``: the runs whose K is drawn (default: every run that
    logged it). GSNR/BSNR values of 0 (NCG while K = 1: NCKD vanishes) are not drawn on the log axes.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(17, 12))
    grid = fig.add_gridspec(3, 3, height_ratios=[1.0, 1.0, 0.42])
    ax_val, ax_seed, ax_k = (fig.add_subplot(grid[0, i]) for i in range(3))
    ax_g, ax_b = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    ax_note = fig.add_subplot(grid[1, 2])
    ax_txt = fig.add_subplot(grid[2, :])
    colours = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = ["-", "--", ":", "-."]
    for key, runs in curves.items():
        xs, mean, std = seed_band(runs, curve)
        if xs:
            c = colours[key]
            ax_val.plot(xs, mean, color=c, marker=".", label=results[key]["label"])
            ax_val.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=c, alpha=0.2)
    ax_val.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher {teacher:.2f}")
    ax_val.set(title="validation, mean ± std over seeds", xlabel=x_label, ylabel=unit)
    if val_ylim:
        ax_val.set_ylim(*val_ylim)
    ax_val.legend(fontsize=8, loc="best")
    ax_val.grid(alpha=0.3)

    for i, (key, r) in enumerate(results.items()):
        if not r[metric]:  # every seed diverged
            continue
        c = colours[key]
        mean, std = mean_std(r[metric])
        ax_seed.errorbar([i], [mean], yerr=[std], fmt="s", color=c, capsize=6, ms=8)
        ax_seed.scatter([i + 0.18] * len(r[metric]), r[metric], color=c, s=18, alpha=0.7)
    ax_seed.set_xticks(range(len(results)))
    ax_seed.set_xticklabels([r["label"] for r in results.values()], rotation=25, ha="right", fontsize=9)
    ax_seed.set(title="final: mean ± std (squares), each seed (dots)", ylabel=unit)
    ax_seed.grid(alpha=0.3, axis="y")

    drawn = [k for k in (curves if k_keys is None else k_keys) if k in curves and seed_band(curves[k], k_curve)[0]]
    for key, ls, lw in zip(drawn, styles, (3.0, 1.5, 1.5, 1.5)):
        xs, mean, _ = seed_band(curves[key], k_curve)
        ax_k.step(xs, mean, where="post", color=colours[key], ls=ls, lw=lw, label=results[key]["label"])
    ax_k.set(title="DeepKD top-k mask: K non-target classes kept", xlabel=x_label, ylabel="K")
    if ax_k.get_legend_handles_labels()[0]:
        ax_k.legend(fontsize=8)
    ax_k.grid(alpha=0.3)

    deep = [k for k in curves if any(run.get("gsnr/tog") for run in curves[k])]
    comp_colours = {"tog": "tab:blue", "tcg": "tab:orange", "ncg": "tab:green"}
    for ax, kind, title in ((ax_g, "gsnr", "gradient SNR (GSNR)"), (ax_b, "bsnr", "momentum-buffer SNR (BSNR)")):
        for key, ls in zip(deep, styles):
            for comp, c in comp_colours.items():
                points = [(x, m) for x, m in zip(*seed_band(curves[key], f"{kind}/{comp}")[:2]) if m > 0]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], ls=ls, color=c, marker=".",
                            label=f"{results[key]['label']} {comp.upper()}")
        ax.set(title=f"DeepKD {title}, mean over seeds", xlabel=x_label, ylabel=f"{kind.upper()} (mean over elements)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)

    ax_note.axis("off")
    ax_note.text(0.0, 1.0, "\n".join(textwrap.wrap(note, 58)), va="top", ha="left", fontsize=10,
                 transform=ax_note.transAxes)
    ax_txt.axis("off")
    ax_txt.text(0.0, 1.0, "\n".join(table), va="top", ha="left", family="monospace", fontsize=9.5,
                transform=ax_txt.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)


def add_demo_arguments(parser, labels: Dict[str, str], default_methods: Sequence[str]) -> None:
    """The options both demos share: ``--seeds``, ``--jobs``, ``--methods``, ``--quick``."""
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side (one torch thread each)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"rows to run, from {', '.join(labels)}, or 'all' (default: {' '.join(default_methods)})")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: checks that everything is written")
    parser.add_argument("--write-docs", nargs="?", const="", default=None, metavar="BLOCK",
                        help="write the table into the docs' block of that name (default: the demo's own block; "
                             "the README's and docs/demos.md's), the picture next to them")
    parser.add_argument("--docs", nargs="+", default=None, metavar="FILE",
                        help="the files --write-docs updates (default: README.md docs/demos.md; needed with --quick)")


def demo_methods_and_seeds(parser, args, labels: Dict[str, str], default_methods: Sequence[str],
                           quick_methods: Sequence[str]) -> Tuple[List[str], List[int]]:
    """The rows (``--methods``; "all": every row; duplicates dropped) and seeds of a demo run;
    an unknown method is a one-line ``parser.error``."""
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    methods = args.methods or list(quick_methods if args.quick else default_methods)
    methods = list(labels) if methods == ["all"] else list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in labels]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(labels)} or 'all'")
    if args.quick and args.write_docs is not None and not args.docs:
        parser.error("--quick --write-docs would put smoke-run numbers into the project's docs: name the files (--docs)")
    return methods, seeds


# ----------------------------------------------------------------------------- the docs' tables
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The files whose demo tables are written by the demos (--write-docs), never by hand.
DOC_FILES = (os.path.join(REPO, "README.md"), os.path.join(REPO, "docs", "demos.md"),
             os.path.join(REPO, "docs", "segmentation.md"))


def docs_block_markers(name: str) -> Tuple[str, str]:
    """The lines that open and close a demo's table in the docs."""
    return (f"<!-- BEGIN {name}: written by the demo (--write-docs), not by hand -->", f"<!-- END {name} -->")


def write_docs_block(path: str, name: str, text: str) -> bool:
    """Replace the lines between ``name``'s markers in ``path`` with ``text``; False (nothing written)
    where the file has no such block. A block opened twice, or not closed, is a ValueError."""
    begin, end = docs_block_markers(name)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    if not starts:
        return False
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{path}: the block {name!r} must be opened and closed exactly once ({begin} ... {end})")
    new = lines[: starts[0] + 1] + text.rstrip("\n").split("\n") + lines[ends[0]:]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(new))
    os.replace(tmp, path)
    return True


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"commit {sha}{' with local changes' if dirty else ''}" if sha else "unknown commit"


def docs_targets(args, demo: str) -> List[str]:
    """The files ``--write-docs`` will update (those holding the block); [] without --write-docs.
    Call it before the run: a block no file holds is a ValueError naming the files."""
    if args.write_docs is None:
        return []
    name = args.write_docs or demo
    files = list(args.docs) if args.docs else list(DOC_FILES)
    holders = []
    for path in files:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if docs_block_markers(name)[0] in f.read().split("\n"):
                    holders.append(path)
    if not holders:
        raise ValueError(f"--write-docs: no block {name!r} in {', '.join(files)} (add the lines "
                         f"{' and '.join(docs_block_markers(name))} where the table goes)")
    return holders


def publish_to_docs(args, demo: str, argv: Optional[Sequence[str]], table: str, picture: Optional[str]) -> List[str]:
    """``--write-docs``: the run's table (exactly as printed), with the command and commit that made
    it, into the block ``args.write_docs`` (default: ``demo``) of each docs file that has one; the
    default block's picture goes to ``<folder of the last such file>/<demo>.png`` (docs/). Returns
    the files written."""
    holders = docs_targets(args, demo)
    if not holders:
        return []
    name = args.write_docs or demo
    command = " ".join(["python", f"tools/{demo}.py", *(sys.argv[1:] if argv is None else argv)])
    text = f"Written by `{command}` at {_commit()}:\n\n{table}"
    written = [f for f in holders if write_docs_block(f, name, text)]
    if picture and name == demo and os.path.isfile(picture):
        shutil.copyfile(picture, os.path.join(os.path.dirname(os.path.abspath(holders[-1])), f"{demo}.png"))
    return written
