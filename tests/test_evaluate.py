"""Model-free evaluation statistics: pass@k, ProblemResult, summarize, write/read."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lens.evaluate import ProblemResult, pass_at_k, read_eval, summarize, write_eval


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


# ---- pass_at_k ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_combinatorial_formula(nck):
    n, c, k = nck
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(1, n - 1))))
def test_pass_at_k_monotone_in_c_and_k(nck):
    n, c, k = nck
    assert pass_at_k(n, c + 1, k) >= pass_at_k(n, c, k)
    assert pass_at_k(n, c, k + 1) >= pass_at_k(n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n: any correct sample counts
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1, 1, 1) == 1.0
    # large n stays finite and exact enough
    assert pass_at_k(10_000, 5, 100) == pytest.approx(1 - math.comb(9995, 100) / math.comb(10_000, 100))


@pytest.mark.parametrize("n,c,k", [(5, -1, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1), (5, 2.5, 1),
                                   (5, 2, 1.0)])
def test_pass_at_k_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---- ProblemResult ------------------------------------------------------------------------------


def test_problem_result_roundtrip_and_validation():
    r = ProblemResult(id="p1", level=3, n=8, correct=5, greedy_correct=1)
    assert ProblemResult.from_dict(r.to_dict()) == r
    assert ProblemResult.from_dict({**r.to_dict(), "future_field": 1}) == r
    assert r.acc == 5 / 8
    assert ProblemResult.from_dict({"id": "q", "level": 1, "n": 4, "correct": 0}).greedy_correct is None
    for bad in [dict(n=0, correct=0), dict(n=4, correct=5), dict(n=4, correct=-1),
                dict(n=4, correct=1, greedy_correct=2)]:
        with pytest.raises(ValueError):
            ProblemResult(id="x", level=1, **bad)


# ---- summarize ----------------------------------------------------------------------------------


def make_results(level_acc: dict[int, list[int]], n: int = 8, greedy: bool = False) -> list[ProblemResult]:
    out = []
    for level, corrects in level_acc.items():
        for i, c in enumerate(corrects):
            out.append(ProblemResult(id=f"L{level}-{i}", level=level, n=n, correct=c,
                                     greedy_correct=(int(c > n // 2) if greedy else None)))
    return out


def test_summarize_known_accuracies():
    results = make_results({1: [8] * 10, 2: [4] * 10, 3: [0] * 10}, n=8)
    s = summarize(results, ks=(1, 2, 4, 8, 16), bootstrap_samples=300)
    lv = s["levels"]
    assert list(lv) == ["1", "2", "3"]
    assert lv["1"]["acc"] == 1.0 and lv["1"]["acc_ci"] == [1.0, 1.0]
    assert lv["3"]["acc"] == 0.0 and lv["3"]["acc_ci"] == [0.0, 0.0]
    assert lv["2"]["acc"] == 0.5 and lv["2"]["acc_ci"] == pytest.approx([0.5, 0.5])
    assert lv["1"]["pass@k"] == {"1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0}  # 16 > n is dropped
    assert lv["2"]["pass@k"]["1"] == pytest.approx(0.5)
    assert lv["2"]["pass@k"]["8"] == 1.0
    assert lv["3"]["pass@k"]["8"] == 0.0
    o = s["overall"]
    assert o["n_problems"] == 30 and o["samples_per_problem"] == 8 and o["n_samples"] == 240
    assert o["acc"] == pytest.approx(0.5)
    assert o["pass@k"]["1"] == pytest.approx(o["acc"])  # pass@1 is the mean accuracy
    assert o["acc_ci"][0] < 0.5 < o["acc_ci"][1]
    assert set(o["pass@k_ci"]) == set(o["pass@k"])
    assert "greedy_acc" not in o
    m = s["metrics"]
    assert m == {
        "eval/acc": o["acc"], "eval/acc_level_1": 1.0, "eval/acc_level_2": 0.5, "eval/acc_level_3": 0.0,
        **{f"eval/pass_at_{k}": v for k, v in o["pass@k"].items()},
    }
    assert s["config"] == {"ks": [1, 2, 4, 8, 16], "bootstrap_samples": 300, "confidence": 0.95, "seed": 0}
    assert [ProblemResult.from_dict(d) for d in s["problems"]] == results


def test_metric_names_are_mlflow_safe():
    s = summarize(make_results({1: [3, 5], 4: [0, 8]}, greedy=True), bootstrap_samples=100)
    for key in s["metrics"]:
        assert re.fullmatch(r"[/\w.\- :]*", key), key  # mlflow's allowed characters
    assert "eval/greedy_acc" in s["metrics"]


def test_summarize_greedy():
    results = make_results({1: [8, 8, 0, 0]}, n=8, greedy=True)
    s = summarize(results, bootstrap_samples=200)
    assert s["overall"]["greedy_acc"] == 0.5
    lo, hi = s["overall"]["greedy_acc_ci"]
    assert lo <= 0.5 <= hi


def test_summarize_mixed_n_uses_min_n_for_pass_at_k():
    results = [ProblemResult("a", 1, 4, 2), ProblemResult("b", 1, 16, 4)]
    s = summarize(results, ks=(1, 2, 4, 8, 16), bootstrap_samples=100)
    assert list(s["overall"]["pass@k"]) == ["1", "2", "4"]
    assert s["overall"]["samples_per_problem"] == 4 and s["overall"]["samples_per_problem_max"] == 16
    assert s["overall"]["acc"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["overall"]["pass@k"]["4"] == pytest.approx((1.0 + pass_at_k(16, 4, 4)) / 2)


def test_single_problem_level_is_degenerate():
    s = summarize([ProblemResult("a", 2, 8, 3), ProblemResult("b", 5, 8, 6)], bootstrap_samples=100)
    assert s["levels"]["2"]["acc_ci"] == [3 / 8, 3 / 8]
    assert s["levels"]["5"]["pass@k_ci"]["2"][0] == s["levels"]["5"]["pass@k"]["2"]


def test_ci_contains_point_and_narrows_with_more_problems():
    rng = np.random.default_rng(1)
    widths = []
    for p in (20, 80, 320):
        corrects = rng.integers(0, 9, size=p).tolist()
        s = summarize(make_results({1: corrects}), ks=(1, 4), bootstrap_samples=500, seed=3)
        o = s["overall"]
        assert o["acc_ci"][0] <= o["acc"] <= o["acc_ci"][1]
        for k, (lo, hi) in o["pass@k_ci"].items():
            assert lo <= o["pass@k"][k] <= hi
        widths.append(o["acc_ci"][1] - o["acc_ci"][0])
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < widths[0] / 2.5  # ~ 1/sqrt(P): 4x problems halves the width


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=40), st.integers(0, 2**31 - 1))
def test_ci_property(corrects, seed):
    s = summarize(make_results({1: corrects}), ks=(1, 2, 8), bootstrap_samples=100, seed=seed)
    o = s["overall"]
    lo, hi = o["acc_ci"]
    assert 0.0 <= lo <= o["acc"] <= hi <= 1.0
    assert o["acc"] == pytest.approx(sum(corrects) / (8 * len(corrects)))


def test_summarize_is_deterministic_and_seeded():
    results = make_results({1: [1, 5, 7, 2, 0, 8, 3], 2: [2, 2, 6, 1]})
    assert summarize(results, seed=7, bootstrap_samples=200) == summarize(results, seed=7, bootstrap_samples=200)
    assert (summarize(results, seed=7, bootstrap_samples=200)["overall"]["acc_ci"]
            != summarize(results, seed=8, bootstrap_samples=200)["overall"]["acc_ci"])


def test_summarize_invalid_inputs():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([ProblemResult("a", 1, 4, 1), ProblemResult("a", 2, 4, 1)])
    with pytest.raises(ValueError):
        summarize([ProblemResult("a", 1, 4, 1)], ks=(0, 1))
    with pytest.raises(ValueError):
        summarize([ProblemResult("a", 1, 4, 1)], confidence=1.5)


def test_write_read_roundtrip(tmp_path):
    s = summarize(make_results({1: [1, 2, 3], 3: [8, 0]}, greedy=True), bootstrap_samples=100)
    path = write_eval(tmp_path / "sub" / "eval.json", s)
    assert read_eval(path) == json.loads(json.dumps(s)) == s
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temp file left behind
    with pytest.raises(ValueError):
        write_eval(tmp_path / "bad.json", {"x": float("nan")})
    assert not (tmp_path / "bad.json").exists()


def test_the_level_4_5_subset_is_a_scope_of_its_own():
    results = [ProblemResult(f"p{lv}-{i}", lv, 4, (i + lv) % 5) for lv in (1, 4, 5) for i in range(6)]
    summary = summarize(results, ks=(1, 2), bootstrap_samples=200)
    hard = [r for r in results if r.level in (4, 5)]
    block = summary["scopes"]["levels_4_5"]
    assert block["n_problems"] == 12
    assert block["acc"] == pytest.approx(sum(r.correct / r.n for r in hard) / 12)
    assert summary["metrics"]["eval/acc_levels_4_5"] == block["acc"] and "eval/pass_at_2_levels_4_5" in summary["metrics"]
    # the other scopes' numbers do not depend on it
    without = summarize([r for r in results if r.level != 5], ks=(1, 2), bootstrap_samples=200)
    assert "levels_4_5" not in without["scopes"]
    assert without["levels"]["1"] == summary["levels"]["1"]
    from lens.evaluate import eval_metrics, evaluation_markdown

    assert "eval/acc_levels_4_5_ci_low" in eval_metrics(summary)
    assert "| 4-5 | 12 |" in evaluation_markdown(summary | {"model": "m"}, "lens", "tiny")
