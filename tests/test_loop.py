"""The one RL loop: rounds, checkpoints at round ends, the run's records, resume and a retried round."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from lens.loop import Runner, plan_rounds, round_ends, train
from lens.records import RunFiles, read_metrics
from lens.train import Trainer
from tests.helpers import random_policy, small_params, synthetic_data

# 3 steps in rounds of 2: round 1 is steps 1-2, round 2 is step 3; checkpoint_every=5 never fires inside a
# round, so the only checkpoints are the round ends. LENS gives a random policy a signal: the weights move.
LOOP = ["train.algo=lens", "train.steps=3", "train.steps_per_round=2", "train.checkpoint_every=5",
        "train.keep_checkpoints=5"]


# ---- planning -----------------------------------------------------------------------------------


def test_round_ends_are_the_last_step_of_each_round():
    assert round_ends(40, 10) == [10, 20, 30, 40]
    assert round_ends(25, 10) == [10, 20, 25]
    assert round_ends(3, 10) == [3]
    assert round_ends(0, 10) == []


@pytest.mark.parametrize("done, target, expected", [
    (0, 40, [(1, 1, 10), (2, 11, 20), (3, 21, 30), (4, 31, 40)]),   # a fresh run
    (15, 40, [(2, 16, 20), (3, 21, 30), (4, 31, 40)]),              # resumed mid-round: its rest first
    (20, 40, [(3, 21, 30), (4, 31, 40)]),                           # resumed at a round end
    (0, 15, [(1, 1, 10), (2, 11, 15)]),                             # max_steps stops mid-round
    (12, 15, [(2, 13, 15)]),
    (40, 40, []),                                                   # nothing left
    (10, 10, []),
    (15, 15, []),                                                   # max_steps=0 mid-round: nothing to run
])
def test_plan_rounds(done, target, expected):
    plan = plan_rounds(done, target, 40, 10)
    assert all(first <= last for _, first, last in plan), f"plan_rounds yields a round with no steps: {plan}"
    assert plan == expected


# ---- training through the loop ------------------------------------------------------------------


class RecordingRunner(Runner):
    """Calls each phase directly and records (name, arm, step) of every phase it ran."""

    def __init__(self):
        super().__init__(progress=False)
        self.phases = []

    def phase(self, name, fn, *, arm, step=None):
        self.phases.append((name, arm, step))
        return super().phase(name, fn, arm=arm, step=step)


class RetryOnceRunner(Runner):
    """Like a Prefect task with retries=1: a round that raises is run again."""

    def __init__(self):
        super().__init__(progress=False)
        self.failures = []

    def round(self, fn, *, arm, index, total):
        try:
            return fn()
        except RuntimeError as exc:
            self.failures.append((index, str(exc)))
            return fn()


def _setup(root, *extra):
    params = small_params(root, *LOOP, *extra)
    random_policy(params)
    synthetic_data(params)
    return params


def _final_weights(params):
    return load_file(RunFiles(params.algo_dir()).final / "model.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted 3-step run, the reference the other runs are compared with."""
    params = _setup(tmp_path_factory.mktemp("uninterrupted"))
    runner = RecordingRunner()
    summary = train(params, runner=runner)
    return params, runner, summary


def test_a_run_checkpoints_at_round_ends_and_writes_its_records(uninterrupted):
    params, _, summary = uninterrupted
    files = RunFiles(params.algo_dir())
    assert sorted(p.name for p in files.checkpoints.glob("step-*")) == ["step-000002", "step-000003"]

    first = json.loads(files.round_manifest(1).read_text())
    second = json.loads(files.round_manifest(2).read_text())
    per_step = params.train.prompts_per_step * params.rollout.group_size
    assert (first["algo"], first["round"], first["steps"]) == ("lens", 1, [1, 2])
    assert first["files"] == ["step-000000.parquet", "step-000001.parquet"] and first["rows"] == 2 * per_step
    assert (second["round"], second["steps"], second["files"]) == (2, [3, 3], ["step-000002.parquet"])
    assert sum(level["samples"] for level in second["by_level"].values()) == second["rows"] == per_step
    assert not files.round_manifest(3).exists()

    written = json.loads(files.train_summary.read_text())
    assert written.keys() >= {"algo", "step", "done", "rounds", "orchestrator", "final_model"}
    assert (written["algo"], written["step"], written["done"], written["orchestrator"]) == ("lens", 3, True, "cli")
    assert written["final_model"] == str(files.final) and (files.final / "model.safetensors").exists()
    assert [(r["round"], r["last_step"]) for r in written["rounds"]] == [(1, 2), (2, 3)]
    assert [r["checkpoint"] for r in written["rounds"]] == [str(files.checkpoints / "step-000002"),
                                                            str(files.checkpoints / "step-000003")]
    assert summary["step"] == 3 and summary["done"]

    assert [r["step"] for r in read_metrics(files.metrics)] == [1, 2, 3]
    start = load_file(params.warm_start_dir / "model" / "model.safetensors")
    final = _final_weights(params)
    assert any(not torch.equal(start[k], final[k]) for k in start), "the policy never moved: nothing to compare"


def test_the_loop_runs_each_phase_in_order_through_the_runner(uninterrupted):
    _, runner, _ = uninterrupted

    def step(n):
        return [("generate_rollouts", "lens", n), ("verify_rollouts", "lens", n), ("update_policy", "lens", n)]

    assert runner.phases == [
        ("open_trainer", "lens", None),
        *step(1), *step(2), ("checkpoint", "lens", 2),
        *step(3), ("checkpoint", "lens", 3),
        ("save_policy", "lens", None),
    ]


def test_stopping_after_max_steps_then_resuming_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    reference, _, _ = uninterrupted
    params = _setup(tmp_path)
    files = RunFiles(params.algo_dir())

    partial = train(params, max_steps=2, runner=Runner(progress=False))
    assert (partial["step"], partial["done"]) == (2, False) and "final_model" not in partial
    assert not files.final.exists()
    assert json.loads(files.train_summary.read_text())["done"] is False

    resumed = train(params, resume=True, runner=Runner(progress=False))
    assert (resumed["step"], resumed["done"]) == (3, True)
    assert [r["round"] for r in resumed["rounds"]] == [2]  # round 1 was done before the stop
    _assert_same_weights(_final_weights(reference), _final_weights(params))
    rows, expected = read_metrics(files.metrics), read_metrics(RunFiles(reference.algo_dir()).metrics)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in expected]


@pytest.mark.parametrize("method, fails_at, after_it_ran", [
    ("rollout", 2, False),          # step 3 fails before it changes anything
    ("update", 2, True),            # step 3 fails with the update applied but not counted
    ("save_checkpoint", 3, False),  # step 3 is recorded (metrics row, rollouts), then its checkpoint fails
])
def test_a_retried_round_restores_from_the_last_checkpoint(uninterrupted, tmp_path, monkeypatch, caplog,
                                                           method, fails_at, after_it_ran):
    reference, _, _ = uninterrupted
    params = _setup(tmp_path)
    real = getattr(Trainer, method)
    failed = []

    def fail_once(self, *args, **kwargs):
        if self.state.step != fails_at or failed:
            return real(self, *args, **kwargs)
        failed.append(self.state.step)
        if after_it_ran:
            real(self, *args, **kwargs)
        raise RuntimeError(f"{method} lost its worker")

    monkeypatch.setattr(Trainer, method, fail_once)
    runner = RetryOnceRunner()
    with caplog.at_level(logging.INFO, logger="lens.loop"):
        summary = train(params, runner=runner)

    assert runner.failures == [(2, f"{method} lost its worker")]
    restored = [r.getMessage() for r in caplog.records if "restored at step" in r.getMessage()]
    assert len(restored) == 1 and "restored at step 2" in restored[0] and "step-000002" in restored[0]
    assert (summary["step"], summary["done"]) == (3, True)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    files = RunFiles(params.algo_dir())
    assert [json.loads(line)["step"] for line in files.metrics.read_text().splitlines()] == [1, 2, 3]
    _assert_same_weights(_final_weights(reference), _final_weights(params))


def test_evaluation_during_training_records_the_curve_and_leaves_training_unchanged(uninterrupted, tmp_path):
    reference, _, _ = uninterrupted
    params = _setup(tmp_path, "eval.every_steps=1", "eval.samples_per_problem=2")
    runner, logged = RecordingRunner(), []
    train(params, runner=runner, callbacks=[lambda step, metrics: logged.append((step, metrics))])
    files = RunFiles(params.algo_dir())
    # every step but the last (the final policy is the evaluate stage's), after the step's own phases
    assert sorted(p.name for p in files.evals.glob("*.json")) == ["step-000001.json", "step-000002.json"]
    assert ("evaluate_policy", "lens", 2) in runner.phases
    assert runner.phases.index(("evaluate_policy", "lens", 1)) > runner.phases.index(("update_policy", "lens", 1))
    first = json.loads(files.eval_at(1).read_text())
    assert (first["step"], first["checkpoint"]) == (1, "step-000001") and 0 <= first["overall"]["acc"] <= 1
    assert [step for step, m in logged if "eval/acc" in m] == [1, 2]
    assert [r["step"] for r in read_metrics(files.metrics)] == [1, 2, 3]
    _assert_same_weights(_final_weights(reference), _final_weights(params))  # evaluating perturbs nothing
