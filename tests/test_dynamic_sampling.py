"""Dynamic sampling (`train.dynamic_sampling`, lens/sampling.py; DAPO, arXiv:2503.14476): zero-variance groups
dropped, extra prompts drawn until the batch is full or the round limit is hit, the cost logged, every draw a
function of (run.seed, step, rank), and under two processes every rank runs the same rounds and trains on as
many groups (a mismatch would hang DDP: the launch's timeout catches it).

The only fake is the verifier's test hook `Verifier(scorer=...)` (tests/test_reward_health.py): a scorer that
makes some groups mixed, which a random tiny policy never does by itself.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
import zlib

import pyarrow.parquet as pq
import pytest
import torch

from lens.sampling import extra_problems, fill_batch, training_set, zero_variance
from lens.verify import Verifier
from tests.helpers import SMALL, model_weights, random_policy, small_params, synthetic_data, trainer_scoring_with

P, G = 4, 4  # tests.helpers.SMALL: train.prompts_per_step, rollout.group_size
DS = ["train.dynamic_sampling=true"]


def half_mixed(completion: str, gold: str) -> float:
    """Test scorer: wrong on every answer to half the questions (by gold), else by the completion's parity."""
    return 0.0 if zlib.crc32(gold.encode()) % 2 else float(len(completion) % 2 == 0)


def _params(root, *extra):
    params = small_params(root, *extra)
    random_policy(params)
    synthetic_data(params)
    return params


_trainer, _weights = trainer_scoring_with, model_weights


def test_extra_draws_are_seeded_by_seed_step_and_draw_and_skip_the_steps_questions():
    from lens.data import synthetic_problems

    problems = synthetic_problems("train", 10, 0)
    drawn = {p.id for p in problems[:40]}
    first = extra_problems(problems, 1, 5, 1, 8, drawn)
    assert first == extra_problems(problems, 1, 5, 1, 8, set(drawn))
    assert not {p.id for p in first} & drawn and len({p.id for p in first}) == 8
    assert first != extra_problems(problems, 1, 5, 2, 8, drawn) != extra_problems(problems, 1, 6, 1, 8, drawn)
    assert first != extra_problems(problems, 2, 5, 1, 8, drawn)
    # Fewer fresh questions than asked for: any questions, still seeded.
    assert len(extra_problems(problems, 1, 5, 1, 8, {p.id for p in problems[:-3]})) == 8
    assert zero_variance(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])).tolist() == [True, True, False]


def test_a_random_policy_draws_up_to_the_limit_logs_the_cost_and_skips_the_update(tmp_path, caplog):
    """All groups all-wrong: LENS would learn from them, dynamic sampling drops them all (the comparison)."""
    params = _params(tmp_path, "train.algo=lens", *DS, "train.dynamic_sampling_max_rounds=3", "train.steps=1")
    trainer = _trainer(params)
    try:
        before = _weights(trainer)
        with caplog.at_level(logging.WARNING, logger="lens.sampling"):
            metrics = trainer.train_step()
        assert metrics["train/dynamic_sampling_rounds"] == 3
        assert metrics["train/rollouts_generated"] == metrics["train/samples"] == 3 * P * G
        assert metrics["train/groups_dropped_zero_variance"] == 3 * P and metrics["train/groups_trained"] == 0
        assert metrics["train/frac_samples_with_signal"] == 0.0 and metrics["train/frac_groups_all_wrong"] == 1.0
        assert trainer.state.updates == 0 and trainer.state.step == 1
        assert all(torch.equal(before[k], v) for k, v in _weights(trainer).items())
        assert "kept 0 of train.prompts_per_step=4 groups with signal after 3 rounds" in caplog.text
        assert "no update this step" in caplog.text
        row = json.loads(trainer.files.metrics.read_text().splitlines()[0])
        assert row["train/rollouts_generated"] == 48 and row["train/dynamic_sampling_rounds"] == 3
        table = pq.read_table(trainer.files.rollout_file(0)).to_pydict()
        assert len(table["completion"]) == 48 and set(table["advantage"]) == {0.0}  # recorded, not trained on
        assert len(set(table["problem_id"])) == 3 * P  # every extra draw asks new questions
    finally:
        trainer.close()


def test_kept_groups_are_exactly_the_mixed_ones_and_fill_the_batch(tmp_path):
    params = _params(tmp_path, "train.algo=grpo", *DS, "train.dynamic_sampling_max_rounds=8")
    trainer = _trainer(params, scorer=half_mixed)
    try:
        first = trainer.score(trainer.rollout(0))
        assert int((~zero_variance(first.correct)).sum()) < P  # the first draw alone would not fill the batch
        scored = fill_batch(trainer, first)
        mixed = ~zero_variance(scored.correct)
        rounds = scored.sampling_rounds
        assert 1 < rounds < 8 and scored.correct.shape == (rounds * P, G)
        # Kept: the first P mixed groups in draw order, no other group; a later mixed one is surplus.
        assert int(scored.trained.sum()) == P and not (scored.trained & ~mixed).any()
        assert torch.equal(scored.trained, mixed & (mixed.cumsum(0) <= P))
        assert (scored.advantages[scored.trained] != 0).all() and (scored.advantages[~scored.trained] == 0).all()
        rollouts, adv, _ = training_set(scored)
        kept_problems = {scored.batch.problems[r.prompt_index].id for r in rollouts}
        assert len(rollouts) == P * G == len(adv) and len(kept_problems) == P
        assert torch.equal(adv, scored.advantages[scored.trained].flatten())
        metrics = trainer.complete_step(scored, time.perf_counter())
        assert trainer.state.updates == 2  # the full batch: 16 samples in mini-batches of 8
        assert metrics["train/groups_trained"] == P and metrics["train/dynamic_sampling_rounds"] == rounds
        assert metrics["train/groups_dropped_zero_variance"] == int((~mixed).sum())
        assert metrics["train/rollouts_generated"] == rounds * P * G
    finally:
        trainer.close()


def _run_two_steps(params) -> tuple[list[dict], dict[str, torch.Tensor]]:
    trainer = _trainer(params, scorer=half_mixed)
    try:
        for _ in range(2):
            trainer.train_step()
        tables = [pq.read_table(trainer.files.rollout_file(s)).to_pydict() for s in range(2)]
        return tables, _weights(trainer)
    finally:
        trainer.close()


def test_two_runs_with_the_same_seed_write_identical_rollouts_and_a_resumed_step_redraws_them(tmp_path):
    params = _params(tmp_path, "train.algo=lens", *DS, "train.dynamic_sampling_max_rounds=4")
    tables, weights = _run_two_steps(params)
    assert max(tables[0]["step"]) == 0 and len(tables[0]["completion"]) > P * G  # extra rounds were drawn
    again, weights_again = _run_two_steps(params)  # a fresh run in the same directory
    assert again == tables and all(torch.equal(weights[k], weights_again[k]) for k in weights)

    # Resumed: step 1 from a checkpoint after step 0 draws and trains exactly as the uninterrupted run.
    trainer = _trainer(params, scorer=half_mixed)
    try:
        trainer.train_step()
        checkpoint = trainer.save_checkpoint()
        trainer.train_step()
        trainer.load_checkpoint(checkpoint)
        trainer.train_step()
        assert pq.read_table(trainer.files.rollout_file(1)).to_pydict() == tables[1]
        assert all(torch.equal(weights[k], v) for k, v in _weights(trainer).items())
    finally:
        trainer.close()


@pytest.mark.slow
def test_two_processes_run_the_same_rounds_and_train_on_as_many_groups(tmp_path):
    """Each rank keeps a different number of mixed groups; both stop together and train on the common count."""
    from tests.test_multiprocess import NO_TRACKING, accelerate_launch, metrics_rows, rollout_tables

    run = ["train.algo=grpo", *DS, "train.dynamic_sampling_max_rounds=4", "train.steps=2", *NO_TRACKING]
    params = _params(tmp_path, *run)
    accelerate_launch("tests.test_dynamic_sampling", ["train", "--profile", "tiny", f"run.output_root={tmp_path}",
                                                      *SMALL, *run], timeout=300)
    out = params.algo_dir("grpo")
    rows, tables = metrics_rows(out), rollout_tables(out)
    assert [r["step"] for r in rows] == [1, 2] and json.loads((out / "train_summary.json").read_text())["done"]
    uneven = 0
    for step, t in tables.items():
        row = rows[step]
        groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for pid, rank, reward, adv in zip(t["problem_id"], t["rank"], t["reward"], t["advantage"]):
            groups.setdefault((rank, pid), []).append((reward, adv))
        mixed, trained = [0, 0], [0, 0]
        for (rank, _), samples in groups.items():
            assert len(samples) == G
            mixed[rank] += len({r for r, _ in samples}) > 1
            trained[rank] += any(a != 0 for _, a in samples)
        # Every rank ran every round (P / 2 questions each), and both trained on the same number of groups.
        per_rank = [sum(1 for rank, _ in groups if rank == r) for r in (0, 1)]
        assert per_rank == [row["train/dynamic_sampling_rounds"] * P // 2] * 2
        assert trained[0] == trained[1] == min(*mixed, P // 2) and row["train/groups_trained"] == sum(trained)
        assert row["train/rollouts_generated"] == len(t["completion"])
        uneven += mixed[0] != mixed[1]
    assert uneven  # some step had ranks keeping different counts: the truncation was exercised


if __name__ == "__main__":  # the CLI with the test scorer, for the two-process launch above
    from lens import cli, train
    from tests.test_dynamic_sampling import half_mixed as scorer  # importable by the verifier's workers

    train.Verifier = functools.partial(Verifier, scorer=scorer)
    sys.exit(cli.main(sys.argv[1:]))
