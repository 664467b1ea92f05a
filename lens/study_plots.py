"""A study report (lens.study_report) as pictures: accuracy by level per arm with t-intervals over seeds and
each seed's value, learning curves with a min-max band over seeds (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lens.compare_plots import _new_figure, _save

CURVE_TITLES = {"train/acc": "training accuracy (rollouts)",
                "train/frac_groups_all_wrong": "fraction of all-wrong groups",
                "train/frac_samples_with_signal": "fraction of samples carrying gradient"}


def scope_label(scope: str) -> str:
    """Table / axis label of a study scope: all, L4-5 (levels_4_5), L3 (level_3)."""
    return "all" if scope == "all" else "L" + scope.split("_", 1)[1].replace("_", "-")


def seed_bands(rows_by_seed: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per curve metric: steps, and per step the mean, min and max over the seeds that logged it (JSON-able)."""
    out = {}
    for key in CURVE_TITLES:
        by_step: dict[int, list[float]] = {}
        for rows in rows_by_seed:
            for r in rows:
                if isinstance(r.get(key), (int, float)):
                    by_step.setdefault(int(r["step"]), []).append(float(r[key]))
        steps = sorted(by_step)
        out[key] = {"steps": steps, "mean": [float(np.mean(by_step[s])) for s in steps],
                    "min": [min(by_step[s]) for s in steps], "max": [max(by_step[s]) for s in steps],
                    "n_seeds": [len(by_step[s]) for s in steps]}
    return out


def plot_accuracy_by_level(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bars: per scope (all, L4-5, each level) each arm's mean accuracy over seeds, its t-interval
    as an error bar, its seeds as dots, and the start policy as a black tick; PNG."""
    arms, scopes = report["arms"], list(report["scopes"])
    x = np.arange(len(scopes))
    width = 0.8 / max(1, len(arms))
    fig = _new_figure(max(6.0, 0.45 * len(arms) * len(scopes) + 2.5), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for j, arm in enumerate(arms):
        blocks = [report["accuracy"][arm][s]["acc"] for s in scopes]
        if not report["seeds"][arm] or any(b is None for b in blocks):
            continue
        pos = x + (j - (len(arms) - 1) / 2) * width
        means = np.array([b["mean"] for b in blocks])
        cis = np.array([b["ci"] if b["ci"] else [b["mean"], b["mean"]] for b in blocks])
        yerr = np.clip(np.stack([means - cis[:, 0], cis[:, 1] - means]), 0.0, None)
        ax.bar(pos, means, width, yerr=yerr, capsize=3, color=f"C{j % 10}", alpha=0.8,
               label=f"{arm.upper()} ({len(report['seeds'][arm])} seeds)")
        for p, b in zip(pos, blocks):
            seeds = [v for v in b["per_seed"].values() if v is not None]
            ax.scatter(np.full(len(seeds), p), seeds, s=10, color="black", zorder=3)
    if report.get("start"):
        start = [report["start"]["acc"][s] for s in scopes]
        ax.hlines(start, x - 0.42, x + 0.42, colors="black", linestyles="dashed", label="start policy")
    ax.set_xticks(x)
    ax.set_xticklabels([scope_label(s) for s in scopes])
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_ylim(0.0, 1.05)
    conf = f"{report['config']['confidence'] * 100:g}%"
    ax.set_title(f"Accuracy by level: bars = mean, error bars = {conf} t-interval over seeds, dots = seeds")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """One subplot per training metric, per arm the mean over seeds with a min-max band over seeds; PNG.
    Keys no arm logged are skipped; with none at all the figure says so."""
    keys = [k for k in CURVE_TITLES if any(report["curves"][a].get(k, {}).get("steps") for a in report["arms"])]
    fig = _new_figure(5.0 * max(1, len(keys)), 3.6)
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training metrics to plot", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for j, arm in enumerate(report["arms"]):
            curve = report["curves"][arm].get(key)
            if not curve or not curve["steps"]:
                continue
            ax.plot(curve["steps"], curve["mean"], color=f"C{j % 10}", label=arm.upper())
            ax.fill_between(curve["steps"], curve["min"], curve["max"], color=f"C{j % 10}", alpha=0.2, linewidth=0)
        ax.set_title(CURVE_TITLES[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", title="mean, band: min-max over seeds", title_fontsize="x-small")
    fig.tight_layout()
    return _save(fig, path)
