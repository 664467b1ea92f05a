"""Checkpoints that are corrupted, incomplete or from other params: detected by their manifest (written
last, with every file's sha256), skipped for the previous complete one, never deleted by --resume."""

from __future__ import annotations

import logging

import pytest

from lens.checkpoint import CheckpointError
from lens.loop import Runner, train
from lens.params import ParamsError
from lens.records import RunFiles, read_manifest, read_metrics
from lens.train import Trainer
from tests.helpers import random_policy, small_params, synthetic_data

RUN = ["train.algo=lens", "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3",
       "train.steps_per_round=1"]


@pytest.fixture
def trained(tmp_path):
    """Three steps with a checkpoint after each: step-000001..3."""
    params = small_params(tmp_path, *RUN)
    random_policy(params)
    synthetic_data(params)
    train(params, runner=Runner(progress=False))
    return params


def _resumed_step(params) -> int:
    trainer = Trainer(params, resume=True)
    try:
        return trainer.state.step
    finally:
        trainer.close()


def _files(directory):
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_a_checkpoint_vouches_for_its_files(trained):
    files = RunFiles(trained.algo_dir())
    manifest = read_manifest(files.checkpoints / "step-000003")
    assert {"model/model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(manifest["files"])
    assert manifest["step"] == 3 and manifest["params"]["train.lr"] == trained.train.lr
    read_manifest(files.final)  # the final policy too


@pytest.mark.parametrize("damage", ["truncate optimizer", "delete trainer_state", "alter weights"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, damage, caplog):
    newest = RunFiles(trained.algo_dir()).checkpoints / "step-000003"
    if damage == "truncate optimizer":
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "delete trainer_state":
        (newest / "trainer_state.json").unlink()
    else:
        weights = newest / "model" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lens.checkpoint"):
        assert _resumed_step(trained) == 2
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step-000003" in warning and "step-000002" in warning  # names both
    assert newest.exists()  # kept for inspection


def test_a_bad_latest_pointer_falls_back_to_the_newest_complete_checkpoint(trained):
    checkpoints = RunFiles(trained.algo_dir()).checkpoints
    (checkpoints / "latest").write_text("step-999999")
    assert _resumed_step(trained) == 3


def test_no_usable_checkpoint_stops_the_resume_and_deletes_nothing(trained):
    files = RunFiles(trained.algo_dir())
    for checkpoint in files.checkpoints.glob("step-*"):
        (checkpoint / "trainer_state.json").unlink()
    before = _files(files.dir)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*nothing was deleted"):
        Trainer(trained, resume=True)
    assert _files(files.dir) == before
    assert [r["step"] for r in read_metrics(files.metrics)] == [1, 2, 3]


def test_resume_with_other_training_params_is_refused_naming_the_keys(trained, tmp_path):
    changed = small_params(tmp_path, *RUN, "train.lr=0.5", "rollout.group_size=2")
    with pytest.raises(ParamsError, match=r"rollout\.group_size: 4 -> 2.*train\.lr"):
        Trainer(changed, resume=True)
    longer = small_params(tmp_path, *RUN[:1], "train.steps=5", *RUN[2:])  # safe to change: train.steps
    assert _resumed_step(longer) == 3


def test_a_damaged_final_policy_is_never_registered(trained):
    from lens import pipeline

    class Enabled:  # a named stand-in: only publish_policy's guard is under test, not MLflow
        enabled = True

    weights = RunFiles(trained.algo_dir()).final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match="not logged or registered"):
        pipeline.publish_policy(trained, Enabled(), Runner(progress=False))


def test_a_second_run_on_the_same_outputs_is_refused_until_the_first_ends(tmp_path):
    from lens.records import RunInUseError, RunLock

    params = small_params(tmp_path, *RUN)
    random_policy(params)
    synthetic_data(params)
    holder = RunLock(params.algo_dir())  # as another process's trainer would hold it
    try:
        with pytest.raises(RunInUseError, match=rf"{params.algo_dir()} is in use by pid \d+"):
            Trainer(params)
    finally:
        holder.release()
    trainer = Trainer(params)  # free again; and a failed start never keeps it
    trainer.close()
    with pytest.raises(ParamsError):
        Trainer(small_params(tmp_path, *RUN, "model.dtype=bfloat16"))
    Trainer(params).close()
