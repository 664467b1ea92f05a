"""The report of a multi-seed study: numbers worked by hand on 2 arms x 3 seeds x 4 problems, paired
differences that find a real gap and none between equal arms, incomplete units listed, mismatched problems
refused, rollout cost per point (with "no gain"), plots and markdown. Run directories are written here the
way a training run writes them (lens.evaluate.write_eval, lens.records.append_metrics / write_rollouts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lens.evaluate import ProblemResult, summarize, write_eval
from lens.records import RunFiles, append_metrics, atomic_write_json, write_rollouts
from lens.study_report import StudyUnit, build_study_report, study_markdown, write_study_report

T_975_DF2 = 4.302652729911275          # Student t quantile 0.975, 2 degrees of freedom (tables)
LEVELS = (1, 1, 4, 5)
GRPO = {0: [1, 2, 0, 3], 1: [2, 2, 1, 3], 2: [0, 2, 1, 4]}   # correct of 4 samples, per seed and problem
LENS = {0: [2, 3, 1, 4], 1: [3, 3, 2, 4], 2: [1, 3, 2, 4]}   # one more correct sample wherever possible
SAMPLES_PER_STEP, TOKENS_PER_SAMPLE, STEPS = 8, 3, 10


def metrics_row(step: int) -> dict:
    return {"step": step, "train/acc": 0.3 + 0.02 * step, "train/frac_groups_all_wrong": 0.5 - 0.04 * step,
            "train/frac_samples_with_signal": 0.3 + 0.03 * step, "train/negative_group_adv_abs_mean": 0.1 * step,
            "train/response_len_mean": 5.0, "perf/rollout_tok_s": 40.0, "perf/rollout_s": 1.0}


def write_eval_file(path, corrects, levels=LEVELS, n=4, ids=None):
    ids = ids or [f"p{i}" for i in range(len(corrects))]
    write_eval(path, summarize([ProblemResult(i, lv, n, c) for i, lv, c in zip(ids, levels, corrects)],
                               bootstrap_samples=20))
    return path


def write_unit(root, arm, seed, corrects, *, levels=LEVELS, n=4, done=True, rollouts=True, ids=None,
               rows=None) -> StudyUnit:
    files = RunFiles(root / f"{arm}-seed{seed}")
    write_eval_file(files.eval, corrects, levels, n, ids)
    for row in rows or [metrics_row(s) for s in range(1, STEPS + 1)]:
        append_metrics(files.metrics, row)
        if rollouts:
            k = SAMPLES_PER_STEP
            write_rollouts(files.rollout_file(row["step"] - 1), {
                "step": [row["step"] - 1] * k, "problem_id": ["p0"] * k, "level": [1] * k, "prompt": ["q"] * k,
                "completion": ["a"] * k, "reward": [0.0] * k, "mean_logprob": [0.0] * k, "advantage": [0.0] * k,
                "num_tokens": [TOKENS_PER_SAMPLE] * k, "truncated": [False] * k, "sample": list(range(k)),
                "rank": [0] * k})
    atomic_write_json(files.train_summary, {"done": done, "step": STEPS})
    return StudyUnit(arm, seed, files.dir)


@pytest.fixture
def study(tmp_path):
    units = [write_unit(tmp_path, arm, s, table[s]) for arm, table in (("grpo", GRPO), ("lens", LENS)) for s in table]
    start = write_eval_file(tmp_path / "start_eval.json", [1, 1, 0, 1])
    return units, start


def test_hand_worked_means_intervals_and_paired_difference(study):
    units, start = study
    r = build_study_report(units, "grpo", start, bootstrap_samples=500)
    assert r["arms"] == ["grpo", "lens"] and r["seeds"] == {"grpo": [0, 1, 2], "lens": [0, 1, 2]}
    assert list(r["scopes"]) == ["all", "levels_4_5", "level_1", "level_4", "level_5"] and r["ks"] == [1, 2, 4]
    acc = r["accuracy"]["grpo"]["all"]["acc"]
    assert acc["per_seed"] == {"0": 0.375, "1": 0.5, "2": 0.4375}        # mean of c/4 over the 4 problems
    half = T_975_DF2 * 0.0625 / math.sqrt(3)                            # sd of (.375, .5, .4375) is 1/16
    assert acc["mean"] == pytest.approx(0.4375) and acc["ci"] == pytest.approx([0.4375 - half, 0.4375 + half])
    assert r["accuracy"]["grpo"]["levels_4_5"]["acc"]["mean"] == pytest.approx((0.375 + 0.5 + 0.625) / 3)
    # pass@4 of 4 samples: 1 when any sample is right; seed 0 has one problem with none right
    assert r["accuracy"]["grpo"]["all"]["pass@4"]["per_seed"]["0"] == 0.75
    assert r["accuracy"]["grpo"]["all"]["pass@1"]["mean"] == pytest.approx(acc["mean"])

    d = r["differences"]["lens"]["acc"]["all"]
    assert d["per_seed"] == pytest.approx([0.25, 0.25, 0.1875]) and d["mean"] == pytest.approx(11 / 48)
    t_stat = (11 / 48) / (np.std([0.25, 0.25, 0.1875], ddof=1) / math.sqrt(3))
    assert t_stat == pytest.approx(11.0)
    assert d["p_t"] == pytest.approx(1 - 11 / math.sqrt(123))  # two-sided p of t with 2 df: 1 - t/sqrt(t^2+2)
    assert d["t_ci"][0] == pytest.approx(11 / 48 - T_975_DF2 * (11 / 48) / 11)
    assert 0 < d["ci"][0] <= d["mean"] <= d["ci"][1] <= 0.25 and d["p_boot"] < 0.01
    level_1 = r["differences"]["lens"]["acc"]["level_1"]      # +1/4 on every (seed, problem): no variance at all
    assert level_1["mean"] == 0.25 and level_1["ci"] == [0.25, 0.25] and level_1["p_t"] is None

    t = r["training"]["grpo"]
    assert t["frac_all_wrong_first"]["mean"] == pytest.approx(0.46)   # first 10% of 10 steps = step 1
    assert t["frac_all_wrong_last"]["mean"] == pytest.approx(0.10)
    wrong = np.array([0.5 - 0.04 * s for s in range(1, 11)])
    adv = np.array([0.1 * s for s in range(1, 11)])             # steps weighted by their all-wrong share
    assert t["neg_adv_abs"]["mean"] == pytest.approx((wrong * adv).sum() / wrong.sum())
    assert t["samples"]["mean"] == STEPS * SAMPLES_PER_STEP and t["tokens"]["mean"] == STEPS * 24
    assert t["rollout_source"] == ["rollouts/*.parquet"]
    cost = r["training"]["lens"]["cost"]                          # start: 0.1875, LENS: 2/3
    gain = 100 * (2 / 3 - 0.1875)
    assert cost["status"] == "ok" and cost["gain_points"]["mean"] == pytest.approx(gain)
    assert cost["samples_per_point"] == pytest.approx(80 / gain)
    assert cost["tokens_per_point"] == pytest.approx(240 / gain)
    curve = r["curves"]["lens"]["train/frac_groups_all_wrong"]
    assert curve["steps"] == list(range(1, 11)) and curve["n_seeds"] == [3] * 10


def test_a_better_arm_excludes_zero_and_an_equal_arm_does_not(tmp_path):
    rng = np.random.default_rng(7)
    p = rng.uniform(0.1, 0.6, size=60)
    levels = [1 + i % 5 for i in range(60)]
    units = []
    for seed in range(4):
        for arm, shift in (("grpo", 0.0), ("same", 0.0), ("better", 0.25)):
            units.append(write_unit(tmp_path, arm, seed, rng.binomial(8, np.clip(p + shift, 0, 1)).tolist(),
                                    levels=levels, n=8, rollouts=False))
    r = build_study_report(units, "grpo", None, bootstrap_samples=1000)
    better, same = r["differences"]["better"]["acc"]["all"], r["differences"]["same"]["acc"]["all"]
    assert better["ci"][0] > 0.1 and better["p_t"] < 0.01 and better["p_boot"] < 0.01
    assert same["ci"][0] < 0 < same["ci"][1] and same["p_boot"] > 0.05 and same["p_t"] > 0.05
    assert r["differences"]["better"]["pass@k"]["1"]["mean"] == pytest.approx(better["mean"])
    assert r["training"]["grpo"]["rollout_source"][0].startswith("derived")  # no rollout files: from perf/...
    assert r["training"]["grpo"]["samples"]["mean"] == STEPS * 8             # 40 tokens/s x 1 s / 5 tokens
    assert r["training"]["grpo"]["cost"]["status"] == "no start evaluation"


def test_the_difference_interval_holds_both_seed_and_problem_variance(tmp_path):
    # "seedy": +1, 0, -1 correct on every problem by seed (spread between seeds only); "problemy": +1, -1, +1, -1
    # by problem on every seed (spread between problems only). Each resampling alone would give [0, 0].
    units = [write_unit(tmp_path, "grpo", s, [2, 2, 2, 2], rollouts=False) for s in range(3)]
    units += [write_unit(tmp_path, "seedy", s, [3 - s] * 4, rollouts=False) for s in range(3)]
    units += [write_unit(tmp_path, "problemy", s, [3, 1, 3, 1], rollouts=False) for s in range(3)]
    r = build_study_report(units, "grpo", None, bootstrap_samples=1000)
    for arm in ("seedy", "problemy"):
        d = r["differences"][arm]["acc"]["all"]
        assert d["mean"] == 0 and d["ci"][0] <= -0.08 and d["ci"][1] >= 0.08 and d["p_boot"] > 0.5
    assert r["differences"]["seedy"]["acc"]["all"]["p_t"] == pytest.approx(1.0)  # mean seed difference 0
    assert r["differences"]["problemy"]["acc"]["all"]["p_t"] is None  # every seed differs by exactly 0


def test_incomplete_units_are_listed_and_left_out(study, tmp_path):
    units, start = study
    unfinished = write_unit(tmp_path / "x", "lens", 3, LENS[0], done=False)
    no_eval = write_unit(tmp_path / "y", "grpo", 4, GRPO[0])
    RunFiles(no_eval.dir).eval.unlink()
    missing = StudyUnit("lens", 5, tmp_path / "never-ran")
    r = build_study_report(units + [unfinished, no_eval, missing], "grpo", start, bootstrap_samples=100)
    reasons = {(i["arm"], i["seed"]): i["reason"] for i in r["incomplete"]}
    assert set(reasons) == {("lens", 3), ("grpo", 4), ("lens", 5)}
    assert "did not finish" in reasons[("lens", 3)] and "eval.json" in reasons[("grpo", 4)]
    assert r["seeds"] == {"grpo": [0, 1, 2], "lens": [0, 1, 2]} and r["differences"]["lens"]["seeds"] == [0, 1, 2]
    assert "## Incomplete units" in study_markdown(r) and "never-ran" in study_markdown(r)
    # a baseline seed lost: the difference pairs only the seeds both arms have
    r = build_study_report([u for u in units if (u.arm, u.seed) != ("grpo", 2)], "grpo", start, bootstrap_samples=100)
    assert r["differences"]["lens"]["seeds"] == [0, 1]
    assert r["differences"]["lens"]["acc"]["all"]["per_seed"] == pytest.approx([0.25, 0.25])


def test_units_on_different_problems_are_refused(study, tmp_path):
    units, start = study
    renamed = write_unit(tmp_path / "z", "lens", 7, LENS[0], ids=["p0", "p1", "p2", "other"])
    with pytest.raises(ValueError, match=r"lens seed 7 .*: 1 ids extra, e.g. \['other'\]; 1 ids missing, e.g. \['p3"):
        build_study_report(units + [renamed], "grpo", start)
    relevelled = write_unit(tmp_path / "w", "lens", 8, LENS[0], levels=(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"1 ids with another level or samples per problem, e.g. \['p3'\]"):
        build_study_report(units + [relevelled], "grpo", start)
    other_start = write_eval_file(tmp_path / "start2.json", [1, 1, 1], levels=(1, 4, 5))
    with pytest.raises(ValueError, match="the start evaluation"):
        build_study_report(units, "grpo", other_start)


def test_no_gain_over_the_start_is_no_gain_not_a_cost(study, tmp_path):
    units, _ = study
    strong_start = write_eval_file(tmp_path / "strong.json", [3, 3, 3, 4])     # 0.8125: above GRPO and LENS
    r = build_study_report(units, "grpo", strong_start, bootstrap_samples=100)
    for arm in ("grpo", "lens"):
        cost = r["training"][arm]["cost"]
        assert cost["status"] == "no gain" and cost["samples_per_point"] is None and cost["tokens_per_point"] is None
        assert cost["gain_points"]["mean"] < 0
    assert "| no gain | no gain |" in study_markdown(r)


def test_bad_study_inputs_are_refused(study):
    units, start = study
    with pytest.raises(ValueError, match="repeated"):
        build_study_report(units + [units[0]], "grpo", start)
    with pytest.raises(ValueError, match="baseline 'drgrpo'"):
        build_study_report(units, "drgrpo", start)
    with pytest.raises(ValueError, match="no complete unit"):
        build_study_report([StudyUnit("grpo", 0, units[0].dir / "nothing")], "grpo", None)


def test_one_seed_has_no_interval_and_says_so(study):
    units, start = study
    r = build_study_report([u for u in units if u.seed == 0], "grpo", start, bootstrap_samples=100)
    assert r["accuracy"]["lens"]["all"]["acc"]["ci"] is None
    d = r["differences"]["lens"]["acc"]["all"]
    assert d["p_t"] is None and d["t_ci"] is None and d["ci"][0] <= d["mean"] <= d["ci"][1]
    assert "0.625 (1 seed)" in study_markdown(r)


def test_report_files_plots_and_markdown(study, tmp_path):
    units, start = study
    r = build_study_report(units, "grpo", start, bootstrap_samples=100)
    paths = write_study_report(r, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "accuracy_by_level", "learning_curves"}
    for name in ("accuracy_by_level", "learning_curves"):
        data = Path(paths[name]).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert json.loads(Path(paths["json"]).read_text()) == json.loads(json.dumps(r))
    md = Path(paths["markdown"]).read_text()
    assert md.index("| arm | seeds | all | L4-5 | L1 | L4 | L5 |") < md.index("## Difference to GRPO")
    assert f"| LENS | 3 | 0.667 ± {T_975_DF2 * 0.0721688 / math.sqrt(3):.3f} |" in md
    assert "| start policy | - | 0.188 |" in md and "Seeds are the unit of training variance" in md
    assert "| LENS | all | +0.229 |" in md
