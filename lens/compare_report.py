"""Reports of a ``lens.compare.compare_arms`` result: markdown, CSV, plots, `dvc plots` data, MLflow metrics
and Prefect table rows. With two arms each report is exactly the pairwise one (``pair_markdown``, ...).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from lens.records import atomic_write_json, atomic_write_text

_STAT_HEADER = ["diff", "diff_ci_low", "diff_ci_high", "p_boot", "wins", "ties", "losses", "sign_test_p"]
_READ_DIFF = ("A difference interval that excludes 0 means the gap is larger than what resampling the "
              "evaluation problems would produce by chance; one that contains 0 means this evaluation set "
              "cannot tell the two apart. ")
_READ_SEEDS = ("None of this accounts for the variance between training runs (seeds): one run per arm is a "
               "single draw - train several seeds before drawing conclusions about the algorithms.")
_READ_POOLED = ("An arm pooled over seeds counts its seeds' samples as extra samples of the same problems (per "
                "problem, samples and correct ones are summed, so pass@k draws its k samples from all the "
                "seeds'; greedy accuracy is the fraction of seeds whose greedy completion is correct). The "
                "intervals still resample problems only: they are not an estimate of the variance between "
                "training runs (seeds), and pooling hides how far the seeds disagree - read each seed's own "
                "evaluation for that.")
_SCOPE_LABELS = {"levels_4_5": "4-5"}  # lens.compare.SCOPES as table labels


def _fmt(v: float, signed: bool = False) -> str:
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _fmt_ci(v: float, ci: Sequence[float], signed: bool = False) -> str:
    return f"{_fmt(v, signed)} [{_fmt(ci[0], signed)}, {_fmt(ci[1], signed)}]"


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _conf(cmp: dict[str, Any]) -> str:
    return f"{cmp['config']['confidence'] * 100:g}%"


def _level_rows(block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(level, row) per level, then per scope ("4-5", ...), then ("all", overall), of a pair or of
    compare_arms' "accuracy"."""
    scopes = [(_SCOPE_LABELS.get(name, name), row) for name, row in block.get("scopes", {}).items()]
    return [*block["levels"].items(), *scopes, ("all", block["overall"])]


def _policy_label(arm: str, policy: dict[str, Any]) -> str:
    """E.g. "LENS final (step 40)"; "LENS (checkpoint not recorded)" for an older eval.json."""
    where = [str(policy["checkpoint"])] if "checkpoint" in policy else []
    where += [f"(step {policy['step']})"] if "step" in policy else []
    return f"{arm.upper()} {' '.join(where) or '(checkpoint not recorded)'}"


def _arms_lines(arms: Sequence[str], cmp: dict[str, Any]) -> list[str]:
    """Paragraphs naming each arm's evaluated checkpoint and its pooled seeds; none where neither is known."""
    policies, seeds = cmp.get("policies", {}), cmp.get("seeds", {})
    lines = []
    if any(policies.get(x) for x in arms):
        lines += [f"Policies: {', '.join(_policy_label(x, policies.get(x, {})) for x in arms)}.", ""]
    if any(seeds.get(x, 1) > 1 for x in arms):
        pooled = (f"pooled over {seeds[x]} seeds" if seeds.get(x, 1) > 1 else "a single seed" for x in arms)
        lines += [f"Seeds: {', '.join(f'{x.upper()} {how}' for x, how in zip(arms, pooled))}.", ""]
    return lines


def _read_seeds(cmp: dict[str, Any]) -> str:
    return _READ_POOLED if any(s > 1 for s in cmp.get("seeds", {}).values()) else _READ_SEEDS


def _only_pair(cmp: dict[str, Any]) -> dict[str, Any] | None:
    """The single pair of a two-arm comparison (whose reports are the pairwise ones), else None."""
    return next(iter(cmp["pairs"].values())) if len(cmp["arms"]) == 2 else None


# ---- one pair (a ``lens.compare.compare`` result) ----------------------------------------------------


def _pairing_line(pair: dict[str, Any]) -> str:
    a, b = pair["names"]
    pairing = pair["pairing"]
    return (f"{pairing['paired']} problems paired by id ({pairing[f'only_in_{a}']} only in {a.upper()}, "
            f"{pairing[f'only_in_{b}']} only in {b.upper()}, left out); "
            f"{pair['config']['bootstrap_samples']} paired bootstrap resamples over problems.")


def _pair_tables(pair: dict[str, Any], heading: str) -> list[str]:
    """The accuracy-by-level table and the pass@k table, under ``heading``-level titles."""
    a, b = pair["names"]
    A, B = a.upper(), b.upper()
    conf = _conf(pair)
    lines = [
        f"{heading} Accuracy (mean over problems of the fraction of correct samples)",
        "",
        (f"| level | problems | {A} acc [{conf} CI] | {B} acc [{conf} CI] | {B} - {A} [{conf} CI] "
         f"| wins / ties / losses | p (bootstrap) | p (sign test) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, row in _level_rows(pair):
        label = "**all**" if level == "all" else level
        lines.append(
            f"| {label} | {row['n_problems']} | {_fmt_ci(row[a], row[f'{a}_ci'])} "
            f"| {_fmt_ci(row[b], row[f'{b}_ci'])} | {_fmt_ci(row['diff'], row['diff_ci'], signed=True)} "
            f"| {row['wins']} / {row['ties']} / {row['losses']} | {_fmt_p(row['p_boot'])} "
            f"| {_fmt_p(row['sign_test_p'])} |")
    extra = [(f"pass@{r['k']}", r) for r in pair.get("pass@k", [])]
    if "greedy" in pair:
        extra.append(("greedy acc", pair["greedy"]))
    if extra:
        lines += [
            "",
            f"{heading} pass@k (all levels)",
            "",
            (f"| metric | problems | {A} [{conf} CI] | {B} [{conf} CI] | {B} - {A} [{conf} CI] "
             f"| p (bootstrap) |"),
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, row in extra:
            lines.append(
                f"| {label} | {row['n_problems']} | {_fmt_ci(row[a], row[f'{a}_ci'])} "
                f"| {_fmt_ci(row[b], row[f'{b}_ci'])} | {_fmt_ci(row['diff'], row['diff_ci'], signed=True)} "
                f"| {_fmt_p(row['p_boot'])} |")
    return lines


def pair_markdown(pair: dict[str, Any]) -> str:
    """A markdown report of ``compare``'s output: accuracy by level, pass@k, and how to read it."""
    A, B = (n.upper() for n in pair["names"])
    conf = _conf(pair)
    how_to_read = (f"Each interval is a {conf} percentile bootstrap over problems; the {B} - {A} interval "
                   f"resamples the same problems for both arms (paired), so differences in problem difficulty "
                   f"cancel. {_READ_DIFF}Wins / ties / losses count problems on which {B}'s per-problem "
                   f"accuracy is higher / equal / lower, and the sign test asks whether wins and losses are "
                   f"balanced. {_read_seeds(pair)}")
    return "\n".join([f"# {B} vs {A}", "", *_arms_lines(pair["names"], pair), _pairing_line(pair), "",
                      *_pair_tables(pair, "##"),
                      "", "## How to read this", "", how_to_read, ""])


def _pair_csv_rows(pair: dict[str, Any]) -> list[tuple[str, str, int | str, dict[str, Any]]]:
    """(metric, level, k, row): one per level (plus "4-5", "all"), one per pass@k, one for greedy."""
    rows: list[tuple[str, str, int | str, dict[str, Any]]]
    rows = [("acc", lv, "", row) for lv, row in _level_rows(pair)]
    rows += [("pass@k", "all", row["k"], row) for row in pair.get("pass@k", [])]
    if "greedy" in pair:
        rows.append(("greedy_acc", "all", "", pair["greedy"]))
    return rows


def _stat_cells(row: dict[str, Any]) -> list[Any]:
    return [row["diff"], *row["diff_ci"], row["p_boot"], row["wins"], row["ties"], row["losses"],
            row["sign_test_p"]]


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def pair_csv(pair: dict[str, Any]) -> str:
    """CSV of ``compare``'s output: one row per level (plus "4-5", "all"), one per pass@k, one for greedy."""
    a, b = pair["names"]
    header = ["metric", "level", "k", "n_problems", a, f"{a}_ci_low", f"{a}_ci_high", b, f"{b}_ci_low",
              f"{b}_ci_high", *_STAT_HEADER]
    return _csv_text(header, [[metric, level, k, row["n_problems"], row[a], *row[f"{a}_ci"], row[b],
                               *row[f"{b}_ci"], *_stat_cells(row)]
                              for metric, level, k, row in _pair_csv_rows(pair)])


# ---- N arms (a ``lens.compare.compare_arms`` result) -------------------------------------------------


def comparison_markdown(cmp: dict[str, Any]) -> str:
    """Markdown report: with two arms ``pair_markdown`` of the pair; with more, every arm's accuracy by
    level, then one section per arm against the baseline, then how to read it."""
    pair = _only_pair(cmp)
    if pair is not None:
        return pair_markdown(pair)
    base, arms, acc = cmp["baseline"], cmp["arms"], cmp["accuracy"]
    BASE, others = base.upper(), [x.upper() for x in arms[1:]]
    conf = _conf(cmp)
    lines = [
        f"# {', '.join(others)} vs {BASE}",
        "",
        (f"{len(arms)} arms, each compared with the baseline {BASE}; "
         f"{cmp['config']['bootstrap_samples']} paired bootstrap resamples over problems."),
        "",
        *_arms_lines(arms, cmp),
        "## Accuracy by arm (mean over problems of the fraction of correct samples)",
        "",
        f"On the {acc['problems']} problems that every arm has.",
        "",
        "| level | problems | " + " | ".join(f"{x.upper()} acc [{conf} CI]" for x in arms) + " |",
        "|---|---:|" + "---:|" * len(arms),
    ]
    for level, row in _level_rows(acc):
        label = "**all**" if level == "all" else level
        cells = " | ".join(_fmt_ci(row[x], row[f"{x}_ci"]) for x in arms)
        lines.append(f"| {label} | {row['n_problems']} | {cells} |")
    for x, pair in cmp["pairs"].items():
        lines += ["", f"## {x.upper()} vs {BASE}", "", _pairing_line(pair), "", *_pair_tables(pair, "###")]
    how_to_read = (f"Each interval is a {conf} percentile bootstrap over problems; each ARM - {BASE} interval "
                   f"resamples the same problems for both arms (paired), so differences in problem difficulty "
                   f"cancel. {_READ_DIFF}Wins / ties / losses count problems on which the arm's per-problem "
                   f"accuracy is higher / equal / lower than {BASE}'s, and the sign test asks whether wins and "
                   f"losses are balanced. With {len(arms) - 1} arms compared against {BASE}, some interval "
                   f"excludes 0 by chance more often than a single comparison's {conf} suggests. {_read_seeds(cmp)}")
    return "\n".join([*lines, "", "## How to read this", "", how_to_read, ""])


def comparison_csv(cmp: dict[str, Any]) -> str:
    """CSV: with two arms ``pair_csv`` of the pair; with more, the rows of every pair with an "arm" column,
    the baseline's value under its name and the arm's under "value"."""
    pair = _only_pair(cmp)
    if pair is not None:
        return pair_csv(pair)
    b = cmp["baseline"]
    header = ["arm", "metric", "level", "k", "n_problems", b, f"{b}_ci_low", f"{b}_ci_high", "value",
              "value_ci_low", "value_ci_high", *_STAT_HEADER]
    return _csv_text(header, [[x, metric, level, k, row["n_problems"], row[b], *row[f"{b}_ci"], row[x],
                               *row[f"{x}_ci"], *_stat_cells(row)]
                              for x, pair in cmp["pairs"].items()
                              for metric, level, k, row in _pair_csv_rows(pair)])


def write_comparison(out_dir: str | os.PathLike[str], cmp: dict[str, Any]) -> dict[str, Path]:
    """Write compare.json, compare.md and compare.csv (each atomically) into ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "json": atomic_write_json(out_dir / "compare.json", cmp, allow_nan=False),
        "md": atomic_write_text(out_dir / "compare.md", comparison_markdown(cmp)),
        "csv": atomic_write_text(out_dir / "compare.csv", comparison_csv(cmp)),
    }


def _pair_metrics(pair: dict[str, Any], prefix: str, with_arm_acc: bool) -> dict[str, float]:
    a, b = pair["names"]
    metrics: dict[str, float] = {}

    def add(suffix: str, row: dict[str, Any]) -> None:
        metrics[f"{prefix}diff_acc{suffix}"] = float(row["diff"])
        metrics[f"{prefix}diff_acc{suffix}_ci_low"], metrics[f"{prefix}diff_acc{suffix}_ci_high"] = (
            float(v) for v in row["diff_ci"])
        metrics[f"{prefix}p_boot{suffix}"] = float(row["p_boot"])
        metrics[f"{prefix}sign_test_p{suffix}"] = float(row["sign_test_p"])
        if with_arm_acc:
            metrics[f"compare/{a}_acc{suffix}"], metrics[f"compare/{b}_acc{suffix}"] = float(row[a]), float(row[b])

    add("", pair["overall"])
    for level, row in pair["levels"].items():
        add(f"_level_{level}", row)
    for scope, row in pair.get("scopes", {}).items():
        add(f"_{scope}", row)
    for row in pair.get("pass@k", []):
        metrics[f"{prefix}diff_pass_at_{row['k']}"] = float(row["diff"])
    if "greedy" in pair:
        metrics[f"{prefix}diff_greedy_acc"] = float(pair["greedy"]["diff"])
    return metrics


def comparison_metrics(cmp: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics. Two arms <a> (baseline), <b>: compare/{diff_acc, diff_acc_ci_low, diff_acc_ci_high,
    p_boot, sign_test_p, <a>_acc, <b>_acc}[_level_{L} | _levels_4_5], compare/diff_pass_at_{k},
    compare/diff_greedy_acc. More arms: compare/<arm>_acc[_level_{L} | _levels_4_5] per arm (on the problems
    all arms have), and per other arm the pair's statistics under compare/<arm>/ (compare/<arm>/diff_acc, ...)."""
    pair = _only_pair(cmp)
    if pair is not None:
        return _pair_metrics(pair, "compare/", with_arm_acc=True)
    acc = cmp["accuracy"]
    metrics = {f"compare/{arm}_acc": float(acc["overall"][arm]) for arm in cmp["arms"]}
    for level, row in acc["levels"].items():
        metrics.update({f"compare/{arm}_acc_level_{level}": float(row[arm]) for arm in cmp["arms"]})
    for scope, row in acc.get("scopes", {}).items():
        metrics.update({f"compare/{arm}_acc_{scope}": float(row[arm]) for arm in cmp["arms"]})
    for x, pair in cmp["pairs"].items():
        metrics.update(_pair_metrics(pair, f"compare/{x}/", with_arm_acc=False))
    return metrics


def comparison_table(cmp: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact, one per level (plus "4-5", "all"). Two arms <a>, <b>: level, problems,
    <a>_acc, <a>_ci, <b>_acc, <b>_ci, diff, diff_ci, p_boot, wins, ties, losses. More arms: one row per arm
    and level, with "arm" first and the arm's own columns named acc, acc_ci."""
    b = cmp["baseline"]

    def r4(values: float | list[float]) -> float | list[float]:
        return [round(v, 4) for v in values] if isinstance(values, list) else round(values, 4)

    def table_row(level: str, row: dict[str, Any], x: str, x_acc: str, x_ci: str) -> dict[str, Any]:
        return {"level": level, "problems": row["n_problems"],
                f"{b}_acc": r4(row[b]), f"{b}_ci": r4(row[f"{b}_ci"]), x_acc: r4(row[x]), x_ci: r4(row[f"{x}_ci"]),
                "diff": r4(row["diff"]), "diff_ci": r4(row["diff_ci"]), "p_boot": row["p_boot"],
                "wins": row["wins"], "ties": row["ties"], "losses": row["losses"]}

    pair = _only_pair(cmp)
    if pair is not None:
        x = cmp["arms"][1]
        return [table_row(level, row, x, f"{x}_acc", f"{x}_ci") for level, row in _level_rows(pair)]
    return [{"arm": x, **table_row(level, row, x, "acc", "acc_ci")}
            for x, pair in cmp["pairs"].items() for level, row in _level_rows(pair)]


# ---- `dvc plots` data (DVC cannot read metrics.jsonl or compare.json) ---------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curve_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV of metric rows: numeric values only, one row per step (the last one logged wins, as after a
    resume), ordered by step; columns are "step" then keys in first-seen order."""
    by_step: dict[Any, dict[str, Any]] = {}
    columns: dict[str, None] = {"step": None}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        clean = {k: v for k, v in row.items() if _number(v)}
        clean["step"] = step
        columns.update(dict.fromkeys(clean))
        by_step[step] = clean
    return _csv_text(list(columns), [[by_step[s].get(c, "") for c in columns] for s in sorted(by_step)])


def write_plot_data(out_dir: str | os.PathLike[str], cmp: dict[str, Any],
                    metrics_by_arm: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    """Under ``out_dir``: curves/<arm>.csv from each arm's metric rows (keys "curves_<arm>") and
    accuracy_by_level.csv (level, <arm>, ... in ``cmp["arms"]`` order; key "accuracy_by_level")."""
    out_dir = Path(out_dir)
    unknown = sorted(set(metrics_by_arm) - set(cmp["arms"]))
    if unknown:
        raise ValueError(f"write_plot_data: metrics for {unknown}, which are not arms of the comparison "
                         f"{cmp['arms']}")
    written = {f"curves_{arm}": atomic_write_text(out_dir / "curves" / f"{arm}.csv", _curve_csv(rows))
               for arm, rows in metrics_by_arm.items()}
    arms = cmp["arms"]
    levels = sorted(cmp["accuracy"]["levels"].items(), key=lambda kv: int(kv[0]))
    by_level = _csv_text(["level", *arms], [[int(lv), *(row[arm] for arm in arms)] for lv, row in levels])
    written["accuracy_by_level"] = atomic_write_text(out_dir / "accuracy_by_level.csv", by_level)
    return written
