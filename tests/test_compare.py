"""Paired comparison of two evaluation summaries, reports and plots."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from lens.compare import (
    compare,
    compare_csv,
    compare_markdown,
    plot_learning_curves,
    plot_levels,
    sign_test_p,
    write_compare,
)
from lens.evaluate import ProblemResult, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def arm(corrects_by_level: dict[int, list[int]], n: int = 8, greedy: bool = False, **kw) -> dict:
    results = [ProblemResult(f"L{lv}-{i}", lv, n, c, (int(c > n // 2) if greedy else None))
               for lv, cs in corrects_by_level.items() for i, c in enumerate(cs)]
    return summarize(results, bootstrap_samples=kw.pop("bootstrap_samples", 200), **kw)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    base = {lv: rng.integers(0, 7, size=25).tolist() for lv in (1, 2, 3)}
    better = {lv: [c + 1 + (i % 2) for i, c in enumerate(cs)] for lv, cs in base.items()}  # strictly better
    return arm(base, greedy=True), arm(better, greedy=True)


def test_identical_arms(pair):
    a, _ = pair
    cmp = compare(a, a, bootstrap_samples=300)
    for row in [cmp["overall"], *cmp["levels"].values(), *cmp["pass@k"]]:
        assert row["diff"] == 0.0
        assert row["diff_ci"][0] <= 0.0 <= row["diff_ci"][1]
        assert row["p_boot"] == 1.0 and row["sign_test_p"] == 1.0
        assert row["wins"] == row["losses"] == 0
        assert row["grpo"] == row["lens"]
    assert cmp["pairing"] == {"paired": 75, "only_in_grpo": 0, "only_in_lens": 0}


def test_strictly_better_arm_excludes_zero(pair):
    a, b = pair
    cmp = compare(a, b, bootstrap_samples=300)
    o = cmp["overall"]
    assert o["diff"] > 0 and o["diff_ci"][0] > 0
    assert o["wins"] == 75 and o["losses"] == 0 and o["ties"] == 0
    assert o["sign_test_p"] < 1e-6 and o["p_boot"] < 0.01
    for lv, row in cmp["levels"].items():
        assert row["diff_ci"][0] > 0, lv
        assert row["grpo_ci"][0] <= row["grpo"] <= row["grpo_ci"][1]
        assert row["diff"] == pytest.approx(row["lens"] - row["grpo"])
    assert [r["k"] for r in cmp["pass@k"]] == [1, 2, 4, 8]
    p1 = cmp["pass@k"][0]  # pass@1 == acc, with the same resamples
    assert [p1["diff"], *p1["diff_ci"], *p1["grpo_ci"]] == pytest.approx([o["diff"], *o["diff_ci"], *o["grpo_ci"]])
    assert cmp["greedy"]["diff"] >= 0
    # swapping arms flips the sign
    rev = compare(b, a, bootstrap_samples=300)
    assert rev["overall"]["diff"] == pytest.approx(-o["diff"])
    assert rev["overall"]["diff_ci"][1] < 0
    json.dumps(cmp, allow_nan=False)  # JSON-serialisable


def test_pairing_by_id_ignores_order_and_counts_unpaired():
    results = [ProblemResult(f"p{i}", 1 + i % 2, 4, i % 5) for i in range(10)]
    a = summarize(results, bootstrap_samples=100)
    b = summarize(list(reversed(results))[:8] + [ProblemResult("extra", 1, 4, 4)], bootstrap_samples=100)
    cmp = compare(a, b, bootstrap_samples=100)
    assert cmp["pairing"] == {"paired": 8, "only_in_grpo": 2, "only_in_lens": 1}
    assert cmp["overall"]["diff"] == 0.0 and cmp["overall"]["ties"] == 8
    assert cmp["overall"]["n_problems"] == 8


def test_pairing_is_not_by_position():
    a = summarize([ProblemResult("x", 1, 4, 0), ProblemResult("y", 1, 4, 4)], bootstrap_samples=100)
    b = summarize([ProblemResult("y", 1, 4, 4), ProblemResult("x", 1, 4, 0)], bootstrap_samples=100)
    cmp = compare(a, b, bootstrap_samples=100)
    assert cmp["overall"]["ties"] == 2 and cmp["overall"]["diff_ci"] == [0.0, 0.0]


def test_compare_errors():
    a = summarize([ProblemResult("x", 1, 4, 0)], bootstrap_samples=100)
    b = summarize([ProblemResult("y", 1, 4, 0)], bootstrap_samples=100)
    with pytest.raises(ValueError):
        compare(a, b)  # nothing in common
    with pytest.raises(ValueError):
        compare(a, summarize([ProblemResult("x", 2, 4, 0)], bootstrap_samples=100))  # level mismatch
    with pytest.raises(ValueError):
        compare(a, a, names=("same", "same"))
    with pytest.raises(ValueError):
        compare({"overall": {}}, a)  # no problems


def test_pass_at_k_uses_common_ks_and_min_n():
    a = arm({1: [1, 2, 3]}, n=4)
    b = arm({1: [1, 2, 3]}, n=16)
    cmp = compare(a, b, bootstrap_samples=100)
    assert [r["k"] for r in cmp["pass@k"]] == [1, 2, 4]


def test_sign_test():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(2 / 2**10)
    assert sign_test_p(1, 9) == pytest.approx(2 * 11 / 2**10)
    assert 0.0 < sign_test_p(3000, 2900) <= 1.0  # large counts stay finite


def test_markdown_and_csv(pair, tmp_path):
    a, b = pair
    cmp = compare(a, b, bootstrap_samples=200)
    md = compare_markdown(cmp)
    assert "| level | problems | GRPO acc [95% CI] | LENS acc [95% CI] | LENS - GRPO [95% CI] |" in md
    for lv in ("1", "2", "3"):
        assert f"\n| {lv} | 25 |" in md
    assert "| **all** | 75 |" in md
    assert "| pass@1 |" in md and "| pass@8 |" in md and "| greedy acc |" in md
    assert "How to read this" in md and "seed" in md

    rows = list(csv.DictReader(io.StringIO(compare_csv(cmp))))
    assert [(r["metric"], r["level"]) for r in rows[:4]] == [("acc", "1"), ("acc", "2"), ("acc", "3"),
                                                            ("acc", "all")]
    assert [r["k"] for r in rows if r["metric"] == "pass@k"] == ["1", "2", "4", "8"]
    assert float(rows[3]["diff"]) == pytest.approx(cmp["overall"]["diff"])
    assert {"grpo", "lens_ci_low", "diff_ci_high", "sign_test_p"} <= set(rows[0])

    paths = write_compare(tmp_path / "out", cmp)
    assert {p.name for p in paths.values()} == {"compare.json", "compare.md", "compare.csv"}
    assert json.loads(paths["json"].read_text()) == cmp
    assert paths["md"].read_text() == md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.csv", "compare.json", "compare.md"]


def test_custom_names(pair):
    a, b = pair
    cmp = compare(a, b, names=("base", "new"), bootstrap_samples=100)
    assert "new" in cmp["overall"] and "base_ci" in cmp["overall"]
    assert "| NEW - BASE [95% CI] |" in compare_markdown(cmp)
    assert "base_ci_low" in compare_csv(cmp).splitlines()[0]


def test_plot_levels(pair, tmp_path):
    cmp = compare(*pair, bootstrap_samples=100)
    path = plot_levels(cmp, tmp_path / "plots" / "levels.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert sorted(p.name for p in path.parent.iterdir()) == ["levels.png"]


def test_plot_learning_curves(tmp_path):
    grpo = [{"step": s, "train/reward_mean": 0.1 + 0.01 * s, "train/acc": 0.2, "train/frac_groups_all_wrong": 0.5}
            for s in range(20)]
    lens = [{"step": s, "train/reward_mean": 0.1 + 0.02 * s, "train/frac_samples_with_signal": 1.0,
             "train/acc": float("nan") if s == 3 else 0.3} for s in range(20)]
    path = plot_learning_curves({"grpo": grpo, "lens": lens}, tmp_path / "curves.png")
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    # absent keys are skipped; nothing plottable still yields a figure
    only = plot_learning_curves({"grpo": grpo}, tmp_path / "one.png", keys=("train/acc", "train/missing"))
    assert only.stat().st_size > 1000
    empty = plot_learning_curves({"grpo": [{"step": 0}]}, tmp_path / "empty.png")
    assert empty.read_bytes().startswith(PNG_MAGIC)
