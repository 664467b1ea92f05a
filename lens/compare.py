"""Paired statistics between evaluation summaries: ``compare`` for two arms, ``compare_arms`` for N arms
against a baseline; an arm is one summary or a list of them (one per training seed), pooled per problem.
Reports (markdown, CSV, plots, metrics) are in lens.compare_report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lens.evaluate import SCOPES, bootstrap_means, pass_at_k, percentile_ci, problem_results

DEFAULT_KS = (1, 2, 4, 8, 16)
_ROW_KEYS = {"k", "n_problems", "diff", "diff_ci", "p_boot", "wins", "losses", "ties", "sign_test_p"}
# Arm names become file names (curves/<arm>.csv), MLflow key parts and table columns.
_ARM_NAME = re.compile(r"\w[\w.\-]*")
# Scopes beyond single levels (lens.evaluate.SCOPES): the same levels and random stream as summarize, so
# an arm's interval here is its eval.json's.

Summary = Mapping[str, Any]
ArmEvals = Summary | Sequence[Summary]  # one summary, or one per training seed


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


# ---- arms: one summary or several seeds' pooled per problem ---------------------------------------


@dataclass(frozen=True)
class PooledResult:
    """One problem's results summed over an arm's seeds: ``correct`` of ``n`` samples, and
    ``greedy_correct`` of ``greedy_runs`` greedy completions (one per seed that recorded one)."""

    id: str
    level: int
    n: int
    correct: int
    greedy_correct: int = 0
    greedy_runs: int = 0

    @property
    def acc(self) -> float:
        return self.correct / self.n

    @property
    def greedy_acc(self) -> float | None:
        """The fraction of seeds whose greedy completion is correct (0 or 1 with one seed)."""
        return self.greedy_correct / self.greedy_runs if self.greedy_runs else None


@dataclass(frozen=True)
class _Arm:
    results: dict[str, PooledResult]  # by problem id, in the first seed's order
    ks: set[int] | None  # pass@k the seeds all reported (None: no seed says)
    seeds: int
    policy: dict[str, Any]  # "checkpoint" and/or "step" of the evaluated policy, where recorded


def _results_by_id(summary: Summary, which: str) -> dict[str, PooledResult]:
    if "problems" not in summary:
        raise ValueError(f"compare: summary {which!r} has no 'problems' (use lens.evaluate.summarize output)")
    out: dict[str, PooledResult] = {}
    for r in problem_results(summary):
        if r.id in out:
            raise ValueError(f"compare: duplicate problem id {r.id!r} in {which!r}")
        greedy = r.greedy_correct is not None
        out[r.id] = PooledResult(r.id, r.level, r.n, r.correct, int(r.greedy_correct or 0), int(greedy))
    return out


def _reported_ks(summary: Summary) -> set[int] | None:
    pk = summary.get("overall", {}).get("pass@k")
    if pk is None:
        ks = summary.get("config", {}).get("ks")
        return None if ks is None else {int(k) for k in ks}
    return {int(k) for k in pk}


def _policy(summaries: Sequence[Summary], name: str) -> dict[str, Any]:
    """The checkpoint and step the seeds were evaluated at; a key some seed lacks is left out."""
    policy = {}
    for key in ("checkpoint", "step"):
        values = [s.get(key) for s in summaries]
        if None in values:
            continue
        if len(set(values)) > 1:
            raise ValueError(f"compare: arm {name!r}: its seeds were evaluated at different {key}s {values}")
        policy[key] = values[0]
    return policy


def _arm(evals: ArmEvals, name: str) -> _Arm:
    """An arm's per-problem results; several seeds' summaries are summed per problem (same problems)."""
    seeds = [evals] if isinstance(evals, Mapping) else list(evals)
    if not seeds:
        raise ValueError(f"compare: arm {name!r} has no summaries")
    per_seed = [_results_by_id(s, name if len(seeds) == 1 else f"{name}, seed {i}") for i, s in enumerate(seeds)]
    first = per_seed[0]
    for i, results in enumerate(per_seed[1:], start=1):
        missing, extra = [p for p in first if p not in results], [p for p in results if p not in first]
        if missing or extra:
            raise ValueError(f"compare: arm {name!r}: seed {i} lacks {len(missing)} problems of seed 0 "
                             f"{missing[:5]} and has {len(extra)} others {extra[:5]}; pooled seeds need the "
                             f"same problems")
        for p, r in results.items():
            if r.level != first[p].level:
                raise ValueError(f"compare: arm {name!r}: problem {p!r} has level {first[p].level} in seed 0 "
                                 f"but {r.level} in seed {i}")
    pooled = {p: PooledResult(p, r.level, *(sum(getattr(s[p], f) for s in per_seed)
                                            for f in ("n", "correct", "greedy_correct", "greedy_runs")))
              for p, r in first.items()}
    reported = [ks for ks in map(_reported_ks, seeds) if ks is not None]
    return _Arm(pooled, set.intersection(*reported) if reported else None, len(seeds), _policy(seeds, name))


# ---- comparisons ----------------------------------------------------------------------------------


def _scope_ids(ids: list[str], level_of: Mapping[str, int]) -> dict[str, list[str]]:
    """The ids of each scope in SCOPES whose levels are all present among ``ids``."""
    present = {level_of[i] for i in ids}
    return {name: [i for i in ids if level_of[i] in levels]
            for name, (levels, _) in SCOPES.items() if present.issuperset(levels)}


def _scope_rng(seed: int, scope: str) -> np.random.Generator:
    """The generator of a multi-level scope, apart from those of overall ([seed, 0]) and each level."""
    return np.random.default_rng([int(seed), SCOPES[scope][1]])


def compare(a: ArmEvals, b: ArmEvals, names: Sequence[str] = ("grpo", "lens"),
            bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of arms ``a`` and ``b`` (differences are b - a). JSON-serialisable.

    Each arm is a ``lens.evaluate.summarize`` output or a list of them, one per training seed. A list is
    pooled per problem: n, correct and the greedy counts are summed over the seeds (who must have the same
    problems), so the seeds' samples count as extra samples of the same problem; an arm's pooled greedy
    accuracy on a problem is the fraction of its seeds whose greedy completion is correct, and its pooled
    pass@k draws the k samples from all seeds' samples. Pooling is not a between-seed variance estimate.

    Problems are paired by id (problems present in only one arm are counted and left out). Overall, per
    level and per scope of SCOPES (Levels 4-5 together, when both levels are paired), a ROW reports:

    * each arm's accuracy (mean over problems of c/n) with its percentile-bootstrap CI;
    * the difference ``b - a`` with a PAIRED bootstrap CI: every resample draws one set of problem
      indices and uses it for both arms, so problem difficulty cancels out of the difference;
    * ``p_boot``: two-sided bootstrap p-value, 2 * min(P*(diff <= 0), P*(diff >= 0)) over the
      resamples, capped at 1 (resolution 1/B; 0 means "no resample crossed zero");
    * a sign test on the per-problem accuracy differences: ``wins`` (b higher), ``losses`` (a higher),
      ``ties``, and ``sign_test_p``, the exact two-sided binomial p-value of wins vs losses (ties
      dropped).

    Overall pass@k rows (k reported by both arms and <= the smallest n of the paired problems) and,
    when both arms have it, greedy accuracy get the same paired treatment. All of this resamples
    problems: it says whether the difference would survive a different draw of problems, not how much
    it varies across training seeds.

    Layout::

        {"names": [a, b], "config": {...},
         "pairing": {"paired", "only_in_<a>", "only_in_<b>"},
         "seeds": {a: S_a, b: S_b}, "policies": {a: {"checkpoint", "step"} (where recorded), b: {...}},
         "overall": ROW, "levels": {"1": ROW, ...}, "scopes": {"levels_4_5": ROW} (when present),
         "pass@k": [{"k": 1, **ROW}, ...], "greedy": ROW (when both arms have greedy results)}

    ROW = {"n_problems", <a>, <b>, "<a>_ci", "<b>_ci", "diff", "diff_ci", "p_boot", "wins", "losses",
    "ties", "sign_test_p"}.
    """
    names = tuple(str(n) for n in names)
    if len(names) != 2 or names[0] == names[1] or set(names) & _ROW_KEYS:
        raise ValueError(f"compare: names must be two distinct labels, got {names}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return _compare(_arm(a, names[0]), _arm(b, names[1]), names, bootstrap_samples, confidence, seed)


def _compare(arm_a: _Arm, arm_b: _Arm, names: tuple[str, str], bootstrap_samples: int, confidence: float,
             seed: int) -> dict[str, Any]:
    ra, rb = arm_a.results, arm_b.results
    ids = [i for i in ra if i in rb]  # a's order
    if not ids:
        raise ValueError("compare: the two summaries share no problem ids")
    for i in ids:
        if ra[i].level != rb[i].level:
            raise ValueError(f"compare: problem {i!r} has level {ra[i].level} in {names[0]!r} "
                             f"but {rb[i].level} in {names[1]!r}")
    pa, pb = [ra[i] for i in ids], [rb[i] for i in ids]

    # pass@k (overall only): the ks both arms reported (default ks when neither says), k <= every paired n
    ks_a, ks_b = arm_a.ks, arm_b.ks
    if ks_a is None and ks_b is None:
        ks = set(DEFAULT_KS)
    elif ks_a is None or ks_b is None:
        ks = ks_a if ks_b is None else ks_b
    else:
        ks = ks_a & ks_b
    n_min = min(min(r.n for r in pa), min(r.n for r in pb))
    ks_used = sorted(k for k in ks if 1 <= k <= n_min)

    def per_problem(results: list[PooledResult], with_ks: bool) -> np.ndarray:
        return np.array([[r.acc] + ([pass_at_k(r.n, r.correct, k) for k in ks_used] if with_ks else [])
                         for r in results])

    def acc_row(sub_ids: list[str], rng: np.random.Generator) -> dict[str, Any]:
        return _paired_block(per_problem([ra[i] for i in sub_ids], False),
                             per_problem([rb[i] for i in sub_ids], False), names, bootstrap_samples,
                             confidence, rng)[0]

    # overall: acc and pass@k share one set of paired resamples (so pass@1 and acc get the same CI)
    rows = _paired_block(per_problem(pa, True), per_problem(pb, True), names, bootstrap_samples, confidence,
                         np.random.default_rng([int(seed), 0]))
    overall, passk = rows[0], [{"k": k, **row} for k, row in zip(ks_used, rows[1:], strict=True)]
    level_of = {i: ra[i].level for i in ids}
    levels = {str(level): acc_row([i for i in ids if level_of[i] == level],
                                  np.random.default_rng([int(seed), int(level)]))
              for level in sorted(set(level_of.values()))}
    scopes = {name: acc_row(sub_ids, _scope_rng(seed, name))
              for name, sub_ids in _scope_ids(ids, level_of).items()}

    out: dict[str, Any] = {
        "names": list(names),
        "config": {"bootstrap_samples": int(bootstrap_samples), "confidence": float(confidence),
                   "seed": int(seed), "diff": f"{names[1]} - {names[0]}"},
        "pairing": {"paired": len(ids), f"only_in_{names[0]}": len(ra) - len(ids),
                    f"only_in_{names[1]}": len(rb) - len(ids)},
        "seeds": {names[0]: arm_a.seeds, names[1]: arm_b.seeds},
        "policies": {names[0]: dict(arm_a.policy), names[1]: dict(arm_b.policy)},
        "overall": overall,
        "levels": levels,
    }
    if scopes:
        out["scopes"] = scopes
    out["pass@k"] = passk
    g_idx = [i for i in range(len(ids)) if pa[i].greedy_runs and pb[i].greedy_runs]
    if g_idx:
        va = np.array([[pa[i].greedy_acc] for i in g_idx])
        vb = np.array([[pb[i].greedy_acc] for i in g_idx])
        out["greedy"] = _paired_block(va, vb, names, bootstrap_samples, confidence,
                                      np.random.default_rng([int(seed), 0, 1]))[0]
    return out


def _check_arm_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not _ARM_NAME.fullmatch(n) or n in _ROW_KEYS]
    clashing = [n for n in names if n.endswith("_ci") and n[:-3] in names]  # "<arm>_ci" is a row key
    if bad or clashing:
        raise ValueError(f"compare_arms: arm names must be word characters, '.' or '-' (not starting with "
                         f"either) and not one of {sorted(_ROW_KEYS)} or '<other arm>_ci'; got {bad + clashing}")


def compare_arms(evals: Mapping[str, ArmEvals], baseline: str, bootstrap_samples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Every arm of ``evals`` against ``baseline``. JSON-serialisable.

    ``evals`` maps an arm name to a ``lens.evaluate.summarize`` output or to a list of them, one per
    training seed, pooled per problem as in ``compare``; >= 2 arms, insertion order is report order.

    Layout::

        {"baseline": b, "arms": [b, x1, x2, ...] (baseline first, then the others in ``evals`` order),
         "config": {"bootstrap_samples", "confidence", "seed", "diff": "<arm> - <baseline>"},
         "seeds": {arm: number of summaries pooled, ...}, "policies": {arm: {"checkpoint", "step"}, ...},
         "pairs": {x: compare(evals[b], evals[x], names=(b, x), same bootstrap and seed), ...},
         "accuracy": {"problems": P, "overall": ACC, "levels": {"1": ACC, ...},
                      "scopes": {"levels_4_5": ACC} (when present)}}

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
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arms = [baseline, *(n for n in names if n != baseline)]
    by_arm = {arm: _arm(evals[arm], arm) for arm in arms}
    pairs = {x: _compare(by_arm[baseline], by_arm[x], (baseline, x), bootstrap_samples, confidence, seed)
             for x in arms[1:]}  # also validates that levels agree with the baseline's

    common = [i for i in by_arm[baseline].results if all(i in arm.results for arm in by_arm.values())]
    if not common:
        raise ValueError(f"compare_arms: no problem id is shared by all arms {arms}")
    level_of = {i: by_arm[baseline].results[i].level for i in common}

    def accuracy(ids: list[str], rng: np.random.Generator) -> dict[str, Any]:
        values = np.array([[by_arm[arm].results[i].acc for arm in arms] for i in ids])  # [P, arms]
        point = values.mean(axis=0)
        lo, hi = percentile_ci(bootstrap_means(values, bootstrap_samples, rng), point, confidence)
        row: dict[str, Any] = {"n_problems": len(ids)}
        for j, arm in enumerate(arms):
            row[arm], row[f"{arm}_ci"] = float(point[j]), [float(lo[j]), float(hi[j])]
        return row

    # the same generator per scope as compare(), so shared problems get the same resamples as in the pairs
    levels = {str(lv): accuracy([i for i in common if level_of[i] == lv],
                                np.random.default_rng([int(seed), int(lv)]))
              for lv in sorted(set(level_of.values()))}
    acc: dict[str, Any] = {"problems": len(common),
                           "overall": accuracy(common, np.random.default_rng([int(seed), 0])),
                           "levels": levels}
    scopes = {name: accuracy(ids, _scope_rng(seed, name)) for name, ids in _scope_ids(common, level_of).items()}
    if scopes:
        acc["scopes"] = scopes
    return {
        "baseline": baseline,
        "arms": arms,
        "config": {"bootstrap_samples": int(bootstrap_samples), "confidence": float(confidence),
                   "seed": int(seed), "diff": f"<arm> - {baseline}"},
        "seeds": {arm: by_arm[arm].seeds for arm in arms},
        "policies": {arm: dict(by_arm[arm].policy) for arm in arms},
        "pairs": pairs,
        "accuracy": acc,
    }
