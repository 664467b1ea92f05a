"""Compare two evaluation summaries (e.g. GRPO vs LENS) problem by problem.

``compare(a, b)`` pairs the problems of two ``lens.evaluate.summarize`` outputs by id (problems present in
only one arm are counted and left out) and reports, overall and per level:

* each arm's accuracy (mean over problems of c/n) with its percentile-bootstrap CI;
* the difference ``b - a`` with a PAIRED bootstrap CI: every resample draws one set of problem indices
  and uses it for both arms, so problem difficulty cancels out of the difference;
* ``p_boot``: two-sided bootstrap p-value, 2 * min(P*(diff <= 0), P*(diff >= 0)) over the resamples,
  capped at 1 (resolution 1/B; 0 means "no resample crossed zero");
* a sign test on the per-problem accuracy differences: ``wins`` (b higher), ``losses`` (a higher),
  ``ties``, and ``sign_test_p``, the exact two-sided binomial p-value of wins vs losses (ties dropped).

Overall pass@k rows (k reported by both summaries and <= the smallest n of the paired problems) and, when
both arms have it, greedy accuracy get the same paired treatment.

All of this is resampling over problems: it says whether the difference would survive a different draw
of problems; it does not measure the variance across training seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lens.evaluate import (
    ProblemResult,
    atomic_write_text,
    bootstrap_means,
    pass_at_k,
    percentile_ci,
    problem_results,
)

DEFAULT_KS = (1, 2, 4, 8, 16)
_ROW_KEYS = {"k", "n_problems", "diff", "diff_ci", "p_boot", "wins", "losses", "ties", "sign_test_p"}
DEFAULT_CURVE_KEYS = ("train/reward_mean", "train/acc", "train/frac_groups_all_wrong",
                      "train/frac_samples_with_signal")


# ---- statistics ---------------------------------------------------------------------------------


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value of ``wins`` vs ``losses`` (ties excluded beforehand)."""
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**m)


def _paired_block(va: np.ndarray, vb: np.ndarray, names: tuple[str, str], bootstrap_samples: int,
                  confidence: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Paired statistics for M metrics given per-problem values va, vb [P, M]; one dict per metric."""
    a_name, b_name = names
    p, m = va.shape
    values = np.concatenate([va, vb, vb - va], axis=1)  # [P, 3M], resampled together
    point = values.mean(axis=0)
    boot = bootstrap_means(values, bootstrap_samples, rng)
    lo, hi = percentile_ci(boot, point, confidence)
    rows = []
    for j in range(m):
        d = 2 * m + j
        diffs = boot[:, d]
        p_boot = min(1.0, 2.0 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
        per_problem = vb[:, j] - va[:, j]
        wins, losses = int(np.sum(per_problem > 0)), int(np.sum(per_problem < 0))
        rows.append({
            "n_problems": int(p),
            a_name: float(point[j]),
            b_name: float(point[m + j]),
            f"{a_name}_ci": [float(lo[j]), float(hi[j])],
            f"{b_name}_ci": [float(lo[m + j]), float(hi[m + j])],
            "diff": float(point[d]),
            "diff_ci": [float(lo[d]), float(hi[d])],
            "p_boot": p_boot,
            "wins": wins,
            "losses": losses,
            "ties": int(p) - wins - losses,
            "sign_test_p": sign_test_p(wins, losses),
        })
    return rows


def _results_by_id(summary: dict[str, Any], which: str) -> dict[str, ProblemResult]:
    if "problems" not in summary:
        raise ValueError(f"compare: summary {which!r} has no 'problems' (use lens.evaluate.summarize output)")
    out: dict[str, ProblemResult] = {}
    for r in problem_results(summary):
        if r.id in out:
            raise ValueError(f"compare: duplicate problem id {r.id!r} in {which!r}")
        out[r.id] = r
    return out


def _reported_ks(summary: dict[str, Any]) -> set[int] | None:
    pk = summary.get("overall", {}).get("pass@k")
    if pk is None:
        ks = summary.get("config", {}).get("ks")
        return None if ks is None else {int(k) for k in ks}
    return {int(k) for k in pk}


def compare(a: dict[str, Any], b: dict[str, Any], names: Sequence[str] = ("grpo", "lens"),
            bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of summaries ``a`` and ``b`` (differences are b - a). JSON-serialisable.

    Layout::

        {"names": [a, b], "config": {...},
         "pairing": {"paired", "only_in_<a>", "only_in_<b>"},
         "overall": ROW, "levels": {"1": ROW, ...},
         "pass@k": [{"k": 1, **ROW}, ...], "greedy": ROW (when both arms have greedy results)}

    ROW = {"n_problems", <a>, <b>, "<a>_ci", "<b>_ci", "diff", "diff_ci", "p_boot", "wins", "losses",
    "ties", "sign_test_p"} (see the module docstring).
    """
    names = tuple(str(n) for n in names)
    if len(names) != 2 or names[0] == names[1] or set(names) & _ROW_KEYS:
        raise ValueError(f"compare: names must be two distinct labels, got {names}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ra, rb = _results_by_id(a, names[0]), _results_by_id(b, names[1])
    ids = [i for i in ra if i in rb]  # a's order
    if not ids:
        raise ValueError("compare: the two summaries share no problem ids")
    for i in ids:
        if ra[i].level != rb[i].level:
            raise ValueError(f"compare: problem {i!r} has level {ra[i].level} in {names[0]!r} "
                             f"but {rb[i].level} in {names[1]!r}")
    pa, pb = [ra[i] for i in ids], [rb[i] for i in ids]

    # pass@k (overall only): the ks both arms reported (default ks when neither says), k <= every paired n
    ks_a, ks_b = _reported_ks(a), _reported_ks(b)
    if ks_a is None and ks_b is None:
        ks = set(DEFAULT_KS)
    elif ks_a is None or ks_b is None:
        ks = ks_a if ks_b is None else ks_b
    else:
        ks = ks_a & ks_b
    n_min = min(min(r.n for r in pa), min(r.n for r in pb))
    ks_used = sorted(k for k in ks if 1 <= k <= n_min)

    def per_problem(results: list[ProblemResult], with_ks: bool) -> np.ndarray:
        return np.array([[r.acc] + ([pass_at_k(r.n, r.correct, k) for k in ks_used] if with_ks else [])
                         for r in results])

    # overall: acc and pass@k share one set of paired resamples (so pass@1 and acc get the same CI)
    rows = _paired_block(per_problem(pa, True), per_problem(pb, True), names, bootstrap_samples, confidence,
                         np.random.default_rng([int(seed), 0]))
    overall, passk = rows[0], [{"k": k, **row} for k, row in zip(ks_used, rows[1:], strict=True)]
    levels = {}
    for level in sorted({r.level for r in pa}):
        sub_a = [r for r in pa if r.level == level]
        sub_b = [rb[r.id] for r in sub_a]
        levels[str(level)] = _paired_block(per_problem(sub_a, False), per_problem(sub_b, False), names,
                                           bootstrap_samples, confidence,
                                           np.random.default_rng([int(seed), int(level)]))[0]

    out: dict[str, Any] = {
        "names": list(names),
        "config": {"bootstrap_samples": int(bootstrap_samples), "confidence": float(confidence),
                   "seed": int(seed), "diff": f"{names[1]} - {names[0]}"},
        "pairing": {"paired": len(ids), f"only_in_{names[0]}": len(ra) - len(ids),
                    f"only_in_{names[1]}": len(rb) - len(ids)},
        "overall": overall,
        "levels": levels,
        "pass@k": passk,
    }
    g_idx = [i for i in range(len(ids))
             if pa[i].greedy_correct is not None and pb[i].greedy_correct is not None]
    if g_idx:
        va = np.array([[float(pa[i].greedy_correct)] for i in g_idx])
        vb = np.array([[float(pb[i].greedy_correct)] for i in g_idx])
        out["greedy"] = _paired_block(va, vb, names, bootstrap_samples, confidence,
                                      np.random.default_rng([int(seed), 0, 1]))[0]
    return out


# ---- reports ------------------------------------------------------------------------------------


def _fmt(v: float, signed: bool = False) -> str:
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _fmt_ci(v: float, ci: Sequence[float], signed: bool = False) -> str:
    return f"{_fmt(v, signed)} [{_fmt(ci[0], signed)}, {_fmt(ci[1], signed)}]"


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _level_rows(cmp: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(lv, row) for lv, row in cmp["levels"].items()] + [("all", cmp["overall"])]


def compare_markdown(cmp: dict[str, Any]) -> str:
    """A markdown report of ``compare``'s output: accuracy by level, pass@k, and how to read it."""
    a, b = cmp["names"]
    A, B = a.upper(), b.upper()
    conf = f"{cmp['config']['confidence'] * 100:g}%"
    pairing = cmp["pairing"]
    lines = [
        f"# {B} vs {A}",
        "",
        f"{pairing['paired']} problems paired by id "
        f"({pairing[f'only_in_{a}']} only in {A}, {pairing[f'only_in_{b}']} only in {B}, left out); "
        f"{cmp['config']['bootstrap_samples']} paired bootstrap resamples over problems.",
        "",
        "## Accuracy (mean over problems of the fraction of correct samples)",
        "",
        f"| level | problems | {A} acc [{conf} CI] | {B} acc [{conf} CI] | {B} - {A} [{conf} CI] "
        f"| wins / ties / losses | p (bootstrap) | p (sign test) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, row in _level_rows(cmp):
        label = "**all**" if level == "all" else level
        lines.append(
            f"| {label} | {row['n_problems']} | {_fmt_ci(row[a], row[f'{a}_ci'])} "
            f"| {_fmt_ci(row[b], row[f'{b}_ci'])} | {_fmt_ci(row['diff'], row['diff_ci'], signed=True)} "
            f"| {row['wins']} / {row['ties']} / {row['losses']} | {_fmt_p(row['p_boot'])} "
            f"| {_fmt_p(row['sign_test_p'])} |")
    extra = [(f"pass@{r['k']}", r) for r in cmp.get("pass@k", [])]
    if "greedy" in cmp:
        extra.append(("greedy acc", cmp["greedy"]))
    if extra:
        lines += [
            "",
            "## pass@k (all levels)",
            "",
            f"| metric | problems | {A} [{conf} CI] | {B} [{conf} CI] | {B} - {A} [{conf} CI] "
            f"| p (bootstrap) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, row in extra:
            lines.append(
                f"| {label} | {row['n_problems']} | {_fmt_ci(row[a], row[f'{a}_ci'])} "
                f"| {_fmt_ci(row[b], row[f'{b}_ci'])} | {_fmt_ci(row['diff'], row['diff_ci'], signed=True)} "
                f"| {_fmt_p(row['p_boot'])} |")
    lines += [
        "",
        "## How to read this",
        "",
        f"Each interval is a {conf} percentile bootstrap over problems; the {B} - {A} interval resamples "
        f"the same problems for both arms (paired), so differences in problem difficulty cancel. "
        f"A difference interval that excludes 0 means the gap is larger than what resampling the "
        f"evaluation problems would produce by chance; one that contains 0 means this evaluation set "
        f"cannot tell the two apart. Wins / ties / losses count problems on which {B}'s per-problem "
        f"accuracy is higher / equal / lower, and the sign test asks whether wins and losses are "
        f"balanced. None of this accounts for the variance between training runs (seeds): one run per "
        f"arm is a single draw - train several seeds before drawing conclusions about the algorithms.",
        "",
    ]
    return "\n".join(lines)


def compare_csv(cmp: dict[str, Any]) -> str:
    """CSV of ``compare``'s output: one row per level (plus "all"), one per pass@k, one for greedy."""
    a, b = cmp["names"]
    header = ["metric", "level", "k", "n_problems", a, f"{a}_ci_low", f"{a}_ci_high", b, f"{b}_ci_low",
              f"{b}_ci_high", "diff", "diff_ci_low", "diff_ci_high", "p_boot", "wins", "ties", "losses",
              "sign_test_p"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)

    def write(metric: str, level: str, k: int | str, row: dict[str, Any]) -> None:
        w.writerow([metric, level, k, row["n_problems"], row[a], *row[f"{a}_ci"], row[b], *row[f"{b}_ci"],
                    row["diff"], *row["diff_ci"], row["p_boot"], row["wins"], row["ties"], row["losses"],
                    row["sign_test_p"]])

    for level, row in _level_rows(cmp):
        write("acc", level, "", row)
    for row in cmp.get("pass@k", []):
        write("pass@k", "all", row["k"], row)
    if "greedy" in cmp:
        write("greedy_acc", "all", "", cmp["greedy"])
    return buf.getvalue()


def write_compare(out_dir: str | os.PathLike[str], cmp: dict[str, Any]) -> dict[str, Path]:
    """Write compare.json, compare.md and compare.csv (each atomically) into ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "json": atomic_write_text(out_dir / "compare.json", json.dumps(cmp, indent=2, allow_nan=False) + "\n"),
        "md": atomic_write_text(out_dir / "compare.md", compare_markdown(cmp)),
        "csv": atomic_write_text(out_dir / "compare.csv", compare_csv(cmp)),
    }


# ---- plots (matplotlib, Agg canvas; no pyplot global state) ---------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_levels(cmp: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bar chart of accuracy by level (and "all") for both arms, with CI error bars; PNG."""
    a, b = cmp["names"]
    rows = _level_rows(cmp)
    labels = [("all" if lv == "all" else f"L{lv}") for lv, _ in rows]
    x = np.arange(len(rows))
    width = 0.38
    fig = _new_figure(max(5.0, 1.1 * len(rows) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for offset, name, color in ((-width / 2, a, "C0"), (width / 2, b, "C1")):
        vals = np.array([row[name] for _, row in rows])
        cis = np.array([row[f"{name}_ci"] for _, row in rows])
        yerr = np.clip(np.stack([vals - cis[:, 0], cis[:, 1] - vals]), 0.0, None)
        ax.bar(x + offset, vals, width, yerr=yerr, capsize=3, label=name.upper(), color=color)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("accuracy (mean over problems)")
    ax.set_ylim(0.0, 1.05)
    conf = f"{cmp['config']['confidence'] * 100:g}%"
    ax.set_title(f"Accuracy by level, {b.upper()} vs {a.upper()} ({conf} bootstrap CI)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _curve(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; the last row wins for a repeated step (e.g. after a resume)."""
    by_step: dict[float, float] = {}
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        step = row.get("step", i)
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            by_step[step] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_learning_curves(metrics_by_algo: dict[str, list[dict[str, Any]]], path: str | os.PathLike[str],
                         keys: Sequence[str] = DEFAULT_CURVE_KEYS) -> Path:
    """One subplot per metric key (keys no algorithm logged are skipped), one line per algorithm; PNG.

    ``metrics_by_algo`` maps an algorithm name to the rows of its metrics.jsonl (dicts with "step").
    With no plottable key at all the figure says so instead of failing.
    """
    curves = {key: {algo: _curve(rows, key) for algo, rows in metrics_by_algo.items()} for key in keys}
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
        for j, (algo, (steps, vals)) in enumerate(curves[key].items()):
            if steps:  # one colour per algorithm across subplots (C0, C1, ... in metrics_by_algo order)
                ax.plot(steps, vals, label=algo.upper(), color=f"C{j % 10}",
                        marker="." if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)
