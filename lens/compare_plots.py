"""The comparison as pictures: accuracy by level per arm with CIs, learning curves per arm (matplotlib,
Agg canvas, no pyplot global state)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lens.compare_report import _conf, _level_rows, _number
from lens.records import atomic_write_bytes

DEFAULT_CURVE_KEYS = ("train/reward_mean", "train/acc", "train/frac_groups_all_wrong",
                      "train/frac_samples_with_signal")


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_levels(cmp: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bar chart of every arm's accuracy by level (and "all"), with CI error bars; PNG."""
    arms = cmp["arms"]
    rows = _level_rows(cmp["accuracy"])
    labels = [("all" if lv == "all" else f"L{lv}") for lv, _ in rows]
    x = np.arange(len(rows))
    width = 0.76 / len(arms)
    fig = _new_figure(max(5.0, (0.55 * len(arms)) * len(rows) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for j, name in enumerate(arms):  # colour j as in plot_learning_curves
        vals = np.array([row[name] for _, row in rows])
        cis = np.array([row[f"{name}_ci"] for _, row in rows])
        yerr = np.clip(np.stack([vals - cis[:, 0], cis[:, 1] - vals]), 0.0, None)
        ax.bar(x + (j - (len(arms) - 1) / 2) * width, vals, width, yerr=yerr, capsize=3, label=name.upper(),
               color=f"C{j % 10}")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("accuracy (mean over problems)")
    ax.set_ylim(0.0, 1.05)
    others = " / ".join(a.upper() for a in arms[1:])
    ax.set_title(f"Accuracy by level, {others} vs {arms[0].upper()} ({_conf(cmp)} bootstrap CI)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _curve(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; the last row wins for a repeated step (e.g. after a resume)."""
    by_step: dict[float, float] = {}
    for i, row in enumerate(rows):
        v = row.get(key)
        if not _number(v):
            continue
        step = row.get("step", i)
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            by_step[step] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_learning_curves(metrics_by_arm: dict[str, list[dict[str, Any]]], path: str | os.PathLike[str],
                         keys: Sequence[str] = DEFAULT_CURVE_KEYS) -> Path:
    """One subplot per metric key (keys no arm logged are skipped), one line per arm; PNG.

    ``metrics_by_arm`` maps an arm name to its metric rows (dicts with "step", as in metrics.jsonl).
    With no plottable key at all the figure says so instead of failing.
    """
    curves = {key: {arm: _curve(rows, key) for arm, rows in metrics_by_arm.items()} for key in keys}
    present = [key for key in keys if any(steps for steps, _ in curves[key].values())]
    ncols = min(2, max(1, len(present)))
    nrows = max(1, math.ceil(len(present) / ncols))
    fig = _new_figure(5.0 * ncols, 3.2 * nrows)
    if not present:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics to plot", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(present):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, (arm, (steps, vals)) in enumerate(curves[key].items()):
            if steps:  # one colour per arm across subplots (C0, C1, ... in metrics_by_arm order)
                ax.plot(steps, vals, label=arm.upper(), color=f"C{j % 10}",
                        marker="." if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)
