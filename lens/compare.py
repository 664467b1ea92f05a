"""Paired statistics between evaluation summaries: ``compare`` for two arms, ``compare_arms`` for N arms
against a baseline. Reports (markdown, CSV, plots, metrics) are in lens.compare_report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lens.evaluate import ProblemResult, bootstrap_means, pass_at_k, percentile_ci, problem_results

DEFAULT_KS = (1, 2, 4, 8, 16)
_ROW_KEYS = {"k", "n_problems", "diff", "diff_ci", "p_boot", "wins", "losses", "ties", "sign_test_p"}
# Arm names become file names (curves/<arm>.csv), MLflow key parts and table columns.
_ARM_NAME = re.compile(r"\w[\w.\-]*")


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

    Problems are paired by id (problems present in only one arm are counted and left out). Overall and
    per level, a ROW reports:

    * each arm's accuracy (mean over problems of c/n) with its percentile-bootstrap CI;
    * the difference ``b - a`` with a PAIRED bootstrap CI: every resample draws one set of problem
      indices and uses it for both arms, so problem difficulty cancels out of the difference;
    * ``p_boot``: two-sided bootstrap p-value, 2 * min(P*(diff <= 0), P*(diff >= 0)) over the
      resamples, capped at 1 (resolution 1/B; 0 means "no resample crossed zero");
    * a sign test on the per-problem accuracy differences: ``wins`` (b higher), ``losses`` (a higher),
      ``ties``, and ``sign_test_p``, the exact two-sided binomial p-value of wins vs losses (ties
      dropped).

    Overall pass@k rows (k reported by both summaries and <= the smallest n of the paired problems) and,
    when both arms have it, greedy accuracy get the same paired treatment. All of this resamples
    problems: it says whether the difference would survive a different draw of problems, not how much
    it varies across training seeds.

    Layout::

        {"names": [a, b], "config": {...},
         "pairing": {"paired", "only_in_<a>", "only_in_<b>"},
         "overall": ROW, "levels": {"1": ROW, ...},
         "pass@k": [{"k": 1, **ROW}, ...], "greedy": ROW (when both arms have greedy results)}

    ROW = {"n_problems", <a>, <b>, "<a>_ci", "<b>_ci", "diff", "diff_ci", "p_boot", "wins", "losses",
    "ties", "sign_test_p"}.
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


def _check_arm_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not _ARM_NAME.fullmatch(n) or n in _ROW_KEYS]
    clashing = [n for n in names if n.endswith("_ci") and n[:-3] in names]  # "<arm>_ci" is a row key
    if bad or clashing:
        raise ValueError(f"compare_arms: arm names must be word characters, '.' or '-' (not starting with "
                         f"either) and not one of {sorted(_ROW_KEYS)} or '<other arm>_ci'; got {bad + clashing}")


def compare_arms(evals: dict[str, dict[str, Any]], baseline: str, bootstrap_samples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Every arm of ``evals`` (name -> ``lens.evaluate.summarize`` output, >= 2 arms, insertion order is
    report order) against ``baseline``. JSON-serialisable.

    Layout::

        {"baseline": b, "arms": [b, x1, x2, ...] (baseline first, then the others in ``evals`` order),
         "config": {"bootstrap_samples", "confidence", "seed", "diff": "<arm> - <baseline>"},
         "pairs": {x: compare(evals[b], evals[x], names=(b, x), same bootstrap and seed), ...},
         "accuracy": {"problems": P, "overall": ACC, "levels": {"1": ACC, ...}}}

    ``accuracy`` is each arm's accuracy on the P problems that every arm has, with percentile-bootstrap
    CIs from one set of resamples shared by all arms: ACC = {"n_problems", <arm>, "<arm>_ci" for every
    arm}. With one set of problems for all arms (the usual case) these are the numbers of each pair's
    rows, so the per-arm table and the pairwise tables agree.
    """
    names = [str(n) for n in evals]
    if baseline not in evals:
        raise ValueError(f"compare_arms: baseline {baseline!r} is not one of the arms {names}")
    if len(names) < 2:
        raise ValueError(f"compare_arms: need at least two arms, got {names}")
    _check_arm_names(names)
    arms = [baseline, *(n for n in names if n != baseline)]
    pairs = {x: compare(evals[baseline], evals[x], names=(baseline, x), bootstrap_samples=bootstrap_samples,
                        confidence=confidence, seed=seed)
             for x in arms[1:]}  # also validates every summary and that levels agree with the baseline's

    by_arm = {arm: _results_by_id(evals[arm], arm) for arm in arms}
    common = [i for i in by_arm[baseline] if all(i in results for results in by_arm.values())]
    if not common:
        raise ValueError(f"compare_arms: no problem id is shared by all arms {arms}")
    levels_of = {i: by_arm[baseline][i].level for i in common}

    def accuracy(ids: list[str], rng: np.random.Generator) -> dict[str, Any]:
        values = np.array([[by_arm[arm][i].acc for arm in arms] for i in ids])  # [P, arms]
        point = values.mean(axis=0)
        lo, hi = percentile_ci(bootstrap_means(values, bootstrap_samples, rng), point, confidence)
        row: dict[str, Any] = {"n_problems": len(ids)}
        for j, arm in enumerate(arms):
            row[arm], row[f"{arm}_ci"] = float(point[j]), [float(lo[j]), float(hi[j])]
        return row

    # the same generator per scope as compare(), so shared problems get the same resamples as in the pairs
    levels = {str(lv): accuracy([i for i in common if levels_of[i] == lv],
                                np.random.default_rng([int(seed), int(lv)]))
              for lv in sorted(set(levels_of.values()))}
    return {
        "baseline": baseline,
        "arms": arms,
        "config": {"bootstrap_samples": int(bootstrap_samples), "confidence": float(confidence),
                   "seed": int(seed), "diff": f"<arm> - {baseline}"},
        "pairs": pairs,
        "accuracy": {"problems": len(common),
                     "overall": accuracy(common, np.random.default_rng([int(seed), 0])),
                     "levels": levels},
    }
