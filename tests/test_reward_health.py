"""Reward health: pathological completions are bounded in time, scored 0 and counted; unparseable gold answers
never score 1 and are dropped at prepare; a step whose rewards are garbage stops the run (or warns loudly).

Everything goes through the real Verifier (real math-verify in real worker processes); the only fake is the
verifier's test hook ``Verifier(scorer=...)``, a scorer that fails on every item, for a broken verifier.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from lens.data import Problem, read_problems
from lens.data.gold_check import GoldCheck, unparseable_golds
from lens.params import ParamsError, load_params
from lens.reward_health import MAX_BRACE_DEPTH, RewardHealth, RewardHealthError, braces_too_deep
from lens.verify import GoldParseError, Verifier, VerifyStats, check_gold

# Keep this module light to import (no torch at the top): the verifier's workers import it for the test hook.

TIMEOUT_S = 2.0
BOUND_S = TIMEOUT_S + 1.0 + 1.5  # the soft limit, the hard kill's grace, slack for a loaded machine


def _fails_everything(completion: str, gold: str):
    """A broken verifier (test hook): every item raises."""
    raise RuntimeError("injected verifier failure")


@pytest.fixture(scope="module")
def verifier():
    with Verifier(timeout_s=TIMEOUT_S, workers=1) as v:
        yield v


# ---- pathological completions ------------------------------------------------------------------
# (name, completion, gold, the counter it lands in). Before this change: nested braces, the power tower
# and 5000 unclosed boxes each cost a full timeout; megabyte text was scored (1.0 on a correct box).
PATHOLOGICAL = [
    ("5000 nested braces", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1", "rejected"),
    ("12 nested bare braces", "\\boxed{" + "{" * 12 + "1" + "}" * 12 + "}", "1", "rejected"),
    ("power tower", "\\boxed{10^{10^{10^{10}}}}", "1", "timeouts"),
    ("unbalanced box", "\\boxed{", "1", "parse_failures"),
    ("20000 unbalanced boxes", "\\boxed{1 " * 20_000, "1", "rejected"),
    ("megabyte with a right box", "x = 1 + 2. " * 100_000 + "\\boxed{3}", "3", "rejected"),
    ("NUL bytes only", "\x00" * 10_000, "1", "parse_failures"),
    ("invalid UTF-8 bytes", b"\xff\xfe\xc3(\x80\x00" * 1000, "1", "parse_failures"),
    ("lone surrogates", "\udcff\ud800" * 1000, "1", "parse_failures"),
    ("empty", "", "1", "parse_failures"),
]


@pytest.mark.parametrize("name, completion, gold, counter", PATHOLOGICAL, ids=[p[0] for p in PATHOLOGICAL])
def test_a_pathological_completion_is_bounded_in_time_scored_0_and_counted(verifier, name, completion, gold,
                                                                          counter):
    t0 = time.monotonic()
    assert verifier.score_batch([completion], [gold]) == [0.0]
    assert time.monotonic() - t0 < BOUND_S
    stats = verifier.last_batch_stats
    assert getattr(stats, counter) == 1 and stats.calls == 1 and stats.correct == 0, stats
    assert verifier.score_batch(["\\boxed{\\frac{1}{2}}"], ["0.5"]) == [1.0]  # and the verifier goes on


def test_a_batch_of_every_pathology_costs_one_timeout_and_scores_the_rest(verifier):
    completions = [c for _, c, _, _ in PATHOLOGICAL] + ["\\boxed{7}", "so \\boxed{8}"]
    golds = [g for _, _, g, _ in PATHOLOGICAL] + ["7", "9"]
    t0 = time.monotonic()
    rewards = verifier.score_batch(completions, golds)
    assert time.monotonic() - t0 < BOUND_S
    assert rewards == [0.0] * len(PATHOLOGICAL) + [1.0, 0.0]
    s = verifier.last_batch_stats
    assert (s.rejected, s.timeouts, s.parse_failures, s.correct, s.errors) == (4, 1, 5, 1, 0)
    assert s.sanitized == 3  # NUL bytes, invalid UTF-8, lone surrogates


def test_nul_bytes_and_invalid_utf8_are_cleaned_and_a_right_answer_still_scores(verifier):
    assert verifier.score_batch(["\x00\\boxed{3}\udcff", b"\\boxed{4}\xff", "\\boxed{5\x00}"], ["3", "4", "5"]) == [
        1.0, 1.0, 1.0]
    assert verifier.last_batch_stats.sanitized == 3


def test_completion_length_cap_is_configurable():
    with Verifier(timeout_s=TIMEOUT_S, workers=1, max_completion_chars=20) as v:
        assert v.score_batch(["\\boxed{3}", "a long way round: \\boxed{3}"], ["3", "3"]) == [1.0, 0.0]
        assert v.last_batch_stats.rejected == 1


def test_brace_depth_matches_a_stack_count():
    assert not braces_too_deep("{" * MAX_BRACE_DEPTH + "}" * MAX_BRACE_DEPTH)
    assert braces_too_deep("{" * (MAX_BRACE_DEPTH + 1) + "}" * (MAX_BRACE_DEPTH + 1))
    assert not braces_too_deep("\\{" * 50 + "\\}" * 50)  # escaped braces are content
    assert not braces_too_deep("{" * 5000)  # never closed: no group at all
    assert not braces_too_deep("\\frac{1}{2} " * 10_000)


@pytest.mark.parametrize("timeout_s", [float("inf"), 1e10, 0.0, -1.0, float("nan")])
def test_a_timeout_the_timer_cannot_hold_is_refused(timeout_s):
    """verify.timeout_s=inf used to overflow setitimer in every worker: every reward 0, exit code 0."""
    with pytest.raises(ValueError, match="timeout_s"):
        Verifier(timeout_s=timeout_s, workers=1)
    with Verifier(workers=0) as v, pytest.raises(ValueError, match="timeout_s"):
        v.score_batch(["\\boxed{1}"], ["1"], timeout_s=timeout_s)
    if timeout_s > 0:
        with pytest.raises(ParamsError, match=r"verify\.timeout_s"):
            load_params("tiny", [f"verify.timeout_s={timeout_s}"])


# ---- gold answers ----------------------------------------------------------------------------
@pytest.mark.parametrize("gold", ["@#!", "\\frac{1}{", "", "   "])
def test_an_unparseable_gold_is_never_scored_1(verifier, gold):
    completions = [f"\\boxed{{{gold}}}", gold, f"The answer is ${gold}$", "\\boxed{1}"]
    assert verifier.score_batch(completions, [gold] * 4) == [0.0] * 4
    s = verifier.last_batch_stats
    assert s.errors == s.gold_errors >= 3 and s.correct == 0, s
    with pytest.raises(GoldParseError, match="no extractable value|cannot be parsed"):
        check_gold(gold)


def test_unparseable_golds_are_found_by_the_verifiers_parser_under_its_time_limit():
    answers = {"ok": "\\frac{1}{2}", "junk": "@#!", "open": "\\frac{1}{", "deep": "{" * 30 + "1" + "}" * 30, "int": "42"}
    problems = [Problem(pid, "q", answer, 1, "s") for pid, answer in answers.items()]
    t0 = time.monotonic()
    assert unparseable_golds(problems, timeout_s=TIMEOUT_S) == [
        ("junk", "@#!"), ("open", "\\frac{1}{"), ("deep", answers["deep"])]
    assert time.monotonic() - t0 < 3 * BOUND_S  # the deep one is stopped by the time limit
    with GoldCheck(TIMEOUT_S) as check:
        assert "timeout" in check.unparseable([answers["deep"]])[answers["deep"]]


def test_prepare_drops_problems_whose_gold_cannot_parse_and_reports_them(tmp_path, caplog):
    from lens import stages

    rows = [{"problem": f"What is {i}?", "level": 1, "answer": answer, "unique_id": f"q{i}"}
            for i, answer in enumerate(["1", "@#!", "\\frac{1}{", "\\frac{1}{2}", "(3, \\pi)"])]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = load_params("tiny", [f"run.output_root={tmp_path / 'runs'}", "data.train_source=math",
                                  "data.eval_source=math", f"data.math_train_path={path}",
                                  f"data.math_eval_path={path}", "verify.workers=1"])
    with caplog.at_level(logging.WARNING, logger="lens.data.gold_check"):
        summary = stages.prepare(params)
    for split in ("train", "eval"):
        assert [p.id for p in read_problems(params.data_dir / f"{split}.jsonl")] == ["q0", "q3", "q4"]
        info = summary["splits"][split]
        assert info["sources"][0]["dropped"] == {"unparseable_gold": 2}
        assert "verify.timeout_s" in info["sources"][0]["rules"]["unparseable_gold"]
        assert [(d["id"], d["answer"], d["source"]) for d in info["unparseable_golds"]] == [
            ("q1", "@#!", str(path)), ("q2", "\\frac{1}{", str(path))]
    assert json.loads((params.data_dir / "report.json").read_text()) == summary
    assert "dropped 2 problem(s): unparseable_gold" in caplog.text and str(path) in caplog.text
    assert "q1='@#!'" in caplog.text


# ---- the step monitor --------------------------------------------------------------------------
def test_an_error_rate_over_the_threshold_stops_with_the_key_and_the_counts():
    with Verifier(timeout_s=TIMEOUT_S, workers=1, scorer=_fails_everything) as v:
        v.score_batch(["\\boxed{1}"] * 4, ["1", "2", "3", "4"])
        stats = v.last_batch_stats
    assert stats.errors == 4
    with pytest.raises(RewardHealthError, match=r"step 7: .* 4/4 = 100% > verify\.max_error_rate=0\.5 \(errors=4 "):
        RewardHealth(max_error_rate=0.5).check(stats, step=7)


def test_the_error_rate_counts_timeouts_and_stops_only_above_the_threshold():
    health = RewardHealth(max_error_rate=0.5, zero_reward_alarm_steps=0)
    assert health.check(VerifyStats(calls=4, correct=2, errors=1, timeouts=1), step=0) == []
    with pytest.raises(RewardHealthError, match=r"3/4 = 75% > verify\.max_error_rate=0\.5.*timeouts=2"):
        health.check(VerifyStats(calls=4, correct=1, errors=1, timeouts=2), step=1)
    assert RewardHealth(max_error_rate=1.0).check(VerifyStats(calls=4, errors=4), step=0) == []  # 1: never


def test_warn_mode_logs_loudly_and_trains_on(caplog):
    health = RewardHealth(max_error_rate=0.1, on_unhealthy="warn")
    with caplog.at_level(logging.WARNING, logger="lens.reward_health"):
        problems = health.check(VerifyStats(calls=10, correct=5, timeouts=5), step=3)
    assert len(problems) == 1 and "verify.max_error_rate=0.1" in problems[0]
    assert "UNHEALTHY REWARDS" in caplog.text and "timeouts=5" in caplog.text


def test_rewards_all_zero_for_n_steps_while_golds_parse_raise_the_alarm(verifier):
    health = RewardHealth(zero_reward_alarm_steps=3)
    wrong = verifier.score_batch(["\\boxed{2}", "no idea"], ["1", "1"]) and verifier.last_batch_stats
    assert wrong.correct == 0 and wrong.gold_errors == 0
    right = verifier.score_batch(["\\boxed{1}", "no idea"], ["1", "1"]) and verifier.last_batch_stats
    assert health.check(wrong, 0) == health.check(wrong, 1) == []
    assert health.check(right, 2) == []  # one right answer resets the count
    assert health.check(wrong, 3) == health.check(wrong, 4) == []
    with pytest.raises(RewardHealthError, match=r"all 0 for 3 consecutive steps \(verify\.zero_reward_alarm_steps=3\)"):
        health.check(wrong, 5)


def test_the_zero_reward_alarm_ignores_steps_whose_golds_all_fail_and_can_be_off(verifier):
    verifier.score_batch(["\\boxed{1}", "\\boxed{2}"], ["@#!", "@#!"])
    bad_golds = verifier.last_batch_stats
    assert bad_golds.gold_errors == bad_golds.calls == 2
    health = RewardHealth(max_error_rate=1.0, zero_reward_alarm_steps=1)
    assert health.check(bad_golds, 0) == [] and health.zero_reward_steps == 0
    off = RewardHealth(zero_reward_alarm_steps=0)
    assert all(off.check(VerifyStats(calls=8, parse_failures=8), step) == [] for step in range(100))


def test_params_configure_the_monitor():
    verify = load_params("tiny", ["verify.max_error_rate=0.2", "verify.zero_reward_alarm_steps=7",
                                  "verify.on_unhealthy=warn"]).verify
    health = RewardHealth.from_params(verify)
    assert (health.max_error_rate, health.zero_reward_alarm_steps, health.on_unhealthy) == (0.2, 7, "warn")
    for bad in ("verify.on_unhealthy=ignore", "verify.max_error_rate=1.5", "verify.zero_reward_alarm_steps=-1",
                "verify.max_completion_chars=0"):
        with pytest.raises(ParamsError, match=bad.split("=")[0].replace(".", r"\.")):
            load_params("tiny", [bad])


def test_a_training_step_with_garbage_rewards_stops_before_the_update(tmp_path, caplog):
    import torch

    from lens.train import Trainer
    from tests.helpers import random_policy, small_params, synthetic_data

    params = small_params(tmp_path, "train.algo=grpo", "verify.zero_reward_alarm_steps=2")
    random_policy(params)
    synthetic_data(params)
    trainer = Trainer(params)
    try:
        weights = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
        real_verifier, trainer.verifier = trainer.verifier, Verifier(timeout_s=TIMEOUT_S, workers=1,
                                                                     scorer=_fails_everything)
        with pytest.raises(RewardHealthError, match=r"16/16 = 100% > verify\.max_error_rate=0\.5 \(errors=16 "):
            trainer.train_step()
        assert trainer.state.step == trainer.state.updates == 0 and not trainer.files.metrics.exists()
        assert all(torch.equal(weights[k], v) for k, v in trainer.unwrapped_model.state_dict().items())

        # The real verifier on a random policy: every reward 0 while the golds parse, step after step.
        trainer.verifier.close()
        trainer.verifier, trainer.reward_health = real_verifier, RewardHealth.from_params(params.verify)
        trainer.train_step()
        with pytest.raises(RewardHealthError, match=r"verify\.zero_reward_alarm_steps=2"):
            trainer.train_step()
        assert trainer.state.step == 1

        trainer.reward_health.on_unhealthy = "warn"
        with caplog.at_level(logging.WARNING, logger="lens.reward_health"):
            trainer.train_step()
        assert trainer.state.step == 2 and "UNHEALTHY REWARDS" in caplog.text
    finally:
        trainer.close()
