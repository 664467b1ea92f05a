"""A run's files (atomic writes, metrics.jsonl, rollouts) and step statistics reduced over processes."""

import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lens.records import (ROLLOUT_COLUMNS, RunFiles, append_metrics, atomic_directory, atomic_write_json,
                          atomic_write_text, last_rollout_files, read_metrics, read_rollouts, sample_rollouts,
                          truncate_metrics, write_rollouts)
from lens.step_stats import RolloutCounts, UpdateStats, reduce_over_processes


# ---- layout -------------------------------------------------------------------------------------


def test_run_files_name_every_file_of_a_run(tmp_path):
    files = RunFiles(tmp_path / "lens")
    assert files.metrics == tmp_path / "lens" / "metrics.jsonl"
    assert files.rollouts == tmp_path / "lens" / "rollouts"
    assert files.checkpoints == tmp_path / "lens" / "checkpoints"
    assert files.final == tmp_path / "lens" / "final"
    assert files.train_summary == tmp_path / "lens" / "train_summary.json"
    assert files.eval == tmp_path / "lens" / "eval.json"
    assert files.rollout_file(7) == tmp_path / "lens" / "rollouts" / "step-000007.parquet"
    assert files.round_manifest(3) == tmp_path / "lens" / "rollouts" / "round-0003.json"


# ---- atomic writes ------------------------------------------------------------------------------


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_text_creates_parents_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "er" / "out.txt"
    assert atomic_write_text(path, "first") == path
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert _entries(path.parent) == ["out.txt"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_text_failing_mid_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert _entries(tmp_path) == ["out.txt"]


def test_atomic_write_json_round_trips(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "a": None}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2]}
    assert path.read_text().endswith("\n")


def test_atomic_directory_replaces_an_existing_directory_on_success(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        (tmp / "model.safetensors").write_text("new")
        assert (target / "stale.bin").exists()  # not replaced until the body succeeds
    assert _entries(target) == ["model.safetensors"]
    assert _entries(tmp_path) == ["final"]


def test_atomic_directory_leaves_the_old_directory_intact_when_the_body_raises(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert (target / "model.safetensors").read_text() == "old"
    assert _entries(tmp_path) == ["final"]


def test_atomic_directory_creates_a_new_directory(tmp_path):
    with atomic_directory(tmp_path / "ckpt" / "step-000001") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "ckpt" / "step-000001" / "a").read_text() == "1"
    assert _entries(tmp_path / "ckpt") == ["step-000001"]


# ---- metrics.jsonl ------------------------------------------------------------------------------


def test_read_metrics_keeps_the_last_row_of_each_step_ordered_by_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for row in [{"step": 2, "train/loss": 2.0}, {"step": 1, "train/loss": 1.0}, {"step": 3, "train/loss": 3.0},
                {"step": 2, "train/loss": 2.5}]:
        append_metrics(path, row)
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/loss"] for r in rows] == [1.0, 2.5, 3.0]


def test_read_metrics_skips_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 1, "train/loss": 1.0})
    append_metrics(path, {"step": 2, "train/loss": 2.0})
    with open(path, "a") as fh:
        fh.write('{"step": 3, "train/lo')  # a process killed mid-write
    with caplog.at_level(logging.WARNING, logger="lens.records"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert any("line 3" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_read_metrics_rejects_a_bad_line_elsewhere_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2")):
        read_metrics(path)


def test_truncate_metrics_keeps_steps_up_to_n(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in range(1, 6):
        append_metrics(path, {"step": step, "train/loss": float(step)})
    with open(path, "a") as fh:
        fh.write('{"step": 6, "tr')
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert len(path.read_text().splitlines()) == 3  # the torn line is gone too
    truncate_metrics(tmp_path / "missing.jsonl", 3)  # nothing to truncate: no error, no file
    assert not (tmp_path / "missing.jsonl").exists()


# ---- rollouts -----------------------------------------------------------------------------------


def _rollout_columns(step: int, rows: int = 4, rank: int = 0) -> dict:
    return {
        "step": [step] * rows, "problem_id": [f"p{step}-{i // 2}" for i in range(rows)],
        "level": [str(1 + i % 2) for i in range(rows)], "prompt": ["Q?"] * rows,
        "completion": [f"answer {step}.{i}" for i in range(rows)], "reward": [float(i % 2) for i in range(rows)],
        "mean_logprob": [-1.0] * rows, "advantage": [0.5 - i % 2 for i in range(rows)],
        "num_tokens": [3] * rows, "truncated": [False] * rows, "sample": [i % 2 for i in range(rows)],
        "rank": [rank] * rows,
    }


def test_write_rollouts_refuses_columns_other_than_the_rollout_columns(tmp_path):
    columns = _rollout_columns(0)
    with pytest.raises(ValueError, match="rollout columns"):
        write_rollouts(tmp_path / "a.parquet", {k: v for k, v in columns.items() if k != "rank"})
    with pytest.raises(ValueError, match="rollout columns"):
        write_rollouts(tmp_path / "b.parquet", columns | {"extra": [0] * 4})
    with pytest.raises(ValueError, match="rollout columns"):  # the order is part of the schema
        write_rollouts(tmp_path / "c.parquet", dict(reversed(list(columns.items()))))
    assert not list(tmp_path.iterdir())


def test_rollouts_round_trip_and_the_last_files_are_the_latest_steps(tmp_path):
    files = RunFiles(tmp_path)
    for step in range(4):
        write_rollouts(files.rollout_file(step), _rollout_columns(step))
    assert _entries(files.rollouts) == [f"step-{s:06d}.parquet" for s in range(4)]  # no temporaries
    last = last_rollout_files(files.rollouts, 2)
    assert [p.name for p in last] == ["step-000002.parquet", "step-000003.parquet"]
    df = read_rollouts(last)
    assert list(df.columns) == list(ROLLOUT_COLUMNS) and len(df) == 8
    assert sorted(set(df["step"])) == [2, 3]
    assert list(read_rollouts(last, ["level", "reward"]).columns) == ["level", "reward"]
    assert last_rollout_files(files.rollouts, 0) == []
    empty = read_rollouts([], ["level", "reward"])
    assert len(empty) == 0 and list(empty.columns) == ["level", "reward"]


def test_sample_rollouts_draws_rows_per_arm_from_the_last_steps_with_an_algo_column(tmp_path):
    dirs = {"grpo": tmp_path / "grpo" / "rollouts", "lens": tmp_path / "lens" / "rollouts"}
    for arm, directory in dirs.items():
        for step in range(4):
            write_rollouts(directory / f"step-{step:06d}.parquet", _rollout_columns(step))
    out = sample_rollouts(dirs, tmp_path / "sample" / "rollouts.parquet", rows_per_arm=5, last_steps=3)
    assert out == tmp_path / "sample" / "rollouts.parquet"
    df = pd.read_parquet(out)
    assert df["algo"].value_counts().to_dict() == {"grpo": 5, "lens": 5}
    assert set(df["step"]) <= {1, 2, 3}  # only the last 3 steps
    assert set(df.columns) == set(ROLLOUT_COLUMNS) | {"algo"}
    again = pd.read_parquet(sample_rollouts(dirs, tmp_path / "again.parquet", rows_per_arm=5, last_steps=3))
    pd.testing.assert_frame_equal(df, again)  # seeded
    assert _entries(out.parent) == ["rollouts.parquet"]


def test_sample_rollouts_keeps_every_row_of_a_small_arm_and_skips_arms_without_rollouts(tmp_path):
    write_rollouts(tmp_path / "lens" / "step-000000.parquet", _rollout_columns(0, rows=3))
    (tmp_path / "grpo").mkdir()
    dirs = {"grpo": tmp_path / "grpo", "lens": tmp_path / "lens", "dr_grpo": tmp_path / "missing"}
    df = pd.read_parquet(sample_rollouts(dirs, tmp_path / "s.parquet", rows_per_arm=5))
    assert df["algo"].tolist() == ["lens"] * 3


def test_sample_rollouts_is_none_when_no_arm_has_rollouts(tmp_path):
    (tmp_path / "grpo").mkdir()
    dirs = {"grpo": tmp_path / "grpo", "lens": tmp_path / "missing"}
    assert sample_rollouts(dirs, tmp_path / "s.parquet", rows_per_arm=5) is None
    assert not (tmp_path / "s.parquet").exists()


# ---- step statistics ----------------------------------------------------------------------------


class FakeTwoProcessAccelerator:
    """A fake accelerator: two processes where the other one holds exactly the same values."""

    num_processes = 2
    device = "cpu"

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor * 2


def test_reduce_over_processes_averages_mean_fields_sums_the_rest_and_keeps_local_ones():
    stats = UpdateStats(loss=1.5, clip_frac=0.25, kl=0.125, entropy=2.0, grad_norm=3.0, tokens=10)
    reduced = reduce_over_processes(stats, FakeTwoProcessAccelerator())
    assert reduced.loss == 1.5 and reduced.clip_frac == 0.25 and reduced.kl == 0.125 and reduced.entropy == 2.0
    assert reduced.grad_norm == 3.0   # LOCAL: already global, not summed
    assert reduced.tokens == 20       # summed over the two processes
    assert stats.tokens == 10         # the process's own record is not changed

    counts = RolloutCounts(correct=3.0, samples=8, groups=2, groups_all_wrong=1, completion_tokens=40,
                           negative_adv_abs=0.5, verify_timeouts=1)
    total = reduce_over_processes(counts, FakeTwoProcessAccelerator())
    assert (total.correct, total.samples, total.groups, total.groups_all_wrong) == (6, 16, 4, 2)
    assert (total.completion_tokens, total.negative_adv_abs, total.verify_timeouts) == (80, 1.0, 2)


def test_reduce_over_one_process_is_the_record_itself():
    stats = UpdateStats(loss=1.0, tokens=5)
    assert reduce_over_processes(stats, None) is stats
    assert reduce_over_processes(stats, SimpleNamespace(num_processes=1)) is stats


def test_rollout_counts_metrics_are_the_ratios_of_the_sums():
    counts = RolloutCounts(correct=6.0, samples=16, groups=4, groups_all_correct=1, groups_all_wrong=2,
                           groups_mixed=1, samples_with_signal=8, completion_tokens=160, truncated=4,
                           negative_adv_abs=2.0, negative_samples=8, verify_timeouts=1, verify_errors=0,
                           verify_parse_failures=2)
    m = counts.metrics(rollout_s=2.0, verify_s=0.5)
    assert m["train/reward_mean"] == m["train/acc"] == 6 / 16
    assert m["train/frac_groups_all_correct"] == 0.25
    assert m["train/frac_groups_all_wrong"] == 0.5
    assert m["train/frac_groups_mixed"] == 0.25
    assert m["train/frac_samples_with_signal"] == 0.5
    assert m["train/response_len_mean"] == 10.0
    assert m["train/truncated_frac"] == 0.25
    assert m["train/negative_group_adv_abs_mean"] == 0.25
    assert m["perf/rollout_tok_s"] == 80.0
    assert (m["verify/timeouts"], m["verify/errors"], m["verify/parse_failures"]) == (1, 0, 2)
    assert (m["perf/rollout_s"], m["perf/verify_s"]) == (2.0, 0.5)
    assert RolloutCounts(samples=4, groups=1).metrics(1.0, 1.0)["train/negative_group_adv_abs_mean"] == 0.0


def test_rollout_counts_of_a_scored_batch():
    correct = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    advantages = torch.tensor([[0.0, 0.0], [-0.5, -0.25], [1.0, -1.0]])
    rollouts = [SimpleNamespace(completion_ids=[0] * n, truncated=n == 4) for n in (1, 2, 3, 4, 4, 1)]
    scored = SimpleNamespace(correct=correct, advantages=advantages, batch=SimpleNamespace(rollouts=rollouts),
                             verify_stats={"timeouts": 1, "parse_failures": 2}, old_logprobs=None,
                             token_advantages=None, trained=None, sampling_rounds=1, verify_streamed=4)
    c = RolloutCounts.of(scored)
    assert c.verify_streamed == 4 and c.metrics(1.0, 0.5, 2.0)["verify/streamed_frac"] == 4 / 6
    assert (c.correct, c.samples, c.groups) == (3.0, 6, 3)
    assert (c.groups_all_correct, c.groups_all_wrong, c.groups_mixed) == (1, 1, 1)
    assert c.samples_with_signal == 4 and c.completion_tokens == 15 and c.truncated == 2
    assert c.negative_adv_abs == 0.75 and c.negative_samples == 2
    assert (c.verify_timeouts, c.verify_errors, c.verify_parse_failures) == (1, 0, 2)
