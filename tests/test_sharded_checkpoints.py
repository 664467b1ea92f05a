"""Checkpoints of two-process runs (DDP, and FSDP2 through the CPU seam) are sharded: each rank writes its
own part with torch.distributed.checkpoint and nothing is gathered. A run stopped after 2 steps and resumed
for the third ends bit for bit where the uninterrupted run does; the checkpoint also resumes in one
process; a damaged or half-written one is refused for the previous one; final/ stays a transformers
directory. Real `accelerate launch` of 2 CPU processes (gloo), with the sharding-independent sampling of
tests/test_multiprocess.py so that one process can continue a two-process run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens.checkpoint_sharded import DCP_DIR, MetadataUnpickler
from lens.records import RunFiles, read_manifest, read_metrics
from tests.conftest import PROJECT_ROOT
from tests.helpers import small_params
from tests.shared_runs import one_process_runs, train_two_processes, two_process_runs
from tests.test_multiprocess import (ATOL_LOGPROB, CPU_CONFIG, EQUIVALENCE, EQUIVALENCE_ARGS, RTOL_TRAIN, gathered_dcp,
                                     install_group_seeded_engine, probe_logprobs)

pytestmark = pytest.mark.slow


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same_tensors(value, b[key], f"{what}.{key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), f"{what}.{key} differs"
        else:
            assert value == b[key], f"{what}.{key}: {value!r} != {b[key]!r}"


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def runs(request, tmp_path_factory):
    return two_process_runs(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The DDP runs alone, for what one backend shows for both (the same objects `runs` gives for ddp)."""
    return two_process_runs("ddp", tmp_path_factory)


def _copy_of_stopped(runs, tmp_path: Path):
    """A private copy of the run stopped after 2 steps, with its params (the tests damage or continue it)."""
    root = tmp_path / "run"
    shutil.copytree(runs.stopped, root)
    params = small_params(root, *EQUIVALENCE)
    return params, RunFiles(params.algo_dir("lens"))


def test_each_rank_writes_its_own_part_and_nothing_is_gathered(runs):
    checkpoints = RunFiles(runs.stopped / "tiny" / "lens").checkpoints
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000001", "step-000002"]
    newest = checkpoints / "step-000002"
    files = {p.relative_to(newest).as_posix(): p.stat().st_size for p in newest.rglob("*") if p.is_file()}
    assert not (newest / "optimizer.pt").exists() and not (newest / "model").exists()
    shards = {rank: files[f"{DCP_DIR}/__{rank}_0.distcp"] for rank in (0, 1)}
    assert sorted(files) == sorted([f"{DCP_DIR}/.metadata", f"{DCP_DIR}/__0_0.distcp", f"{DCP_DIR}/__1_0.distcp",
                                    "manifest.json", "scheduler.pt", "trainer_state.json"])
    assert set(read_manifest(newest)["files"]) == set(files) - {"manifest.json"}  # the shards are vouched for
    # Disjoint parts: DCP's metadata names one file for each piece of state (DDP replicates every tensor on
    # both ranks, FSDP splits each), and the files hold those pieces and nothing else (no second copy).
    with open(newest / DCP_DIR / ".metadata", "rb") as fh:
        metadata = MetadataUnpickler(fh).load()
    referenced = {f"__{rank}_0.distcp": 0 for rank in (0, 1)}
    for piece in metadata.storage_data.values():
        referenced[piece.relative_path] += piece.length
    assert referenced == {f"__{rank}_0.distcp": size for rank, size in shards.items()}
    assert {key.split(".")[0] for key in metadata.state_dict_metadata} == {"model", "optimizer"}
    assert min(shards.values()) > 0.2 * sum(shards.values()), shards  # both ranks write a real share


def test_stopped_and_resumed_equals_the_uninterrupted_run_bit_for_bit(runs):
    whole, resumed = runs.whole, runs.resumed
    assert_same_tensors(load_file(whole.final / "model.safetensors"), load_file(resumed.final / "model.safetensors"),
                        "final")
    assert_same_tensors(gathered_dcp(whole.checkpoints / "step-000003", runs.scratch / "w"),
                        gathered_dcp(resumed.checkpoints / "step-000003", runs.scratch / "r"), "step-000003")
    rows_whole, rows_resumed = read_metrics(whole.metrics), read_metrics(resumed.metrics)
    assert [r["step"] for r in rows_resumed] == [1, 2, 3]
    for a, b in zip(rows_whole, rows_resumed):
        assert _untimed(a) == _untimed(b)


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("perf/")}  # timings differ, every value else is equal


def test_final_is_a_transformers_directory_with_the_checkpointed_weights(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs.whole.final)
    saved = gathered_dcp(runs.whole.checkpoints / "step-000003", runs.scratch / "f")["model"]
    assert_same_tensors(model.state_dict(), saved, "final")
    read_manifest(runs.whole.final)


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from lens import cli
    from lens.train import Trainer

    params, files = _copy_of_stopped(runs, tmp_path)
    install_group_seeded_engine(monkeypatch.setattr)
    trainer = Trainer(params, resume=True)
    try:
        assert trainer.state.step == 2
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer.optimizer,
                                                  options=StateDictOptions(full_state_dict=True))
        saved = gathered_dcp(files.checkpoints / "step-000002", tmp_path)
        assert_same_tensors(model_state, saved["model"], "model")
        assert_same_tensors(optim_state["state"], saved["optimizer"]["state"], "optimizer")
        assert trainer.scheduler.get_last_lr() == pytest.approx([5e-4], rel=0)  # after update 2 of 3
    finally:
        trainer.close()
    assert cli.main([*EQUIVALENCE_ARGS, f"run.output_root={tmp_path / 'run'}", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(files.metrics)] == [1, 2, 3]
    assert files.trained()


@pytest.mark.parametrize("damage", ["truncate rank 1's shard", "delete the metadata", "alter rank 0's shard"])
def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(runs, damage, tmp_path, caplog):
    from lens.train import Trainer

    params, files = _copy_of_stopped(runs, tmp_path)
    shards = files.checkpoints / "step-000002" / DCP_DIR
    if damage == "truncate rank 1's shard":
        data = (shards / "__1_0.distcp").read_bytes()
        (shards / "__1_0.distcp").write_bytes(data[: len(data) // 2])
    elif damage == "delete the metadata":
        (shards / ".metadata").unlink()
    else:
        data = bytearray((shards / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (shards / "__0_0.distcp").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lens.checkpoint"):
        trainer = Trainer(params, resume=True)
        trainer.close()
    assert trainer.state.step == 1
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step-000002" in warning and "step-000001" in warning


def test_two_processes_refuse_a_damaged_shard_together(ddp_runs, tmp_path):
    """usable() under two processes: rank 0 checks, both resume from the same older checkpoint (the choice
    is the same collective under both backends: DDP shows it)."""
    runs = ddp_runs
    _, files = _copy_of_stopped(runs, tmp_path)
    shard = files.checkpoints / "step-000002" / DCP_DIR / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    proc = train_two_processes(tmp_path / "run", "ddp", "--resume")
    assert "resuming from" in proc.stderr and "__1_0.distcp does not match its checksum" in proc.stderr
    assert "resumed from" in proc.stderr and "(step 1)" in proc.stderr
    assert [r["step"] for r in read_metrics(files.metrics)] == [1, 2, 3]
    assert_same_tensors(load_file(runs.whole.final / "model.safetensors"), load_file(files.final / "model.safetensors"),
                        "final")


def test_a_kill_before_the_manifest_leaves_nothing_usable_behind(ddp_runs, tmp_path):
    """SIGKILL of rank 0 after every rank wrote its shards, before the manifest: the half-written directory
    is not a checkpoint; --resume continues from the previous one and the run ends as the uninterrupted one.
    (The save path is the same for both backends: DDP shows it.)"""
    runs = ddp_runs
    from lens.checkpoint import Checkpointer

    _, files = _copy_of_stopped(runs, tmp_path)
    root = tmp_path / "run"
    exe = Path(sys.executable).parent / "accelerate"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([str(exe), "launch", "--config_file", str(CPU_CONFIG), "-m", "tests.kill_at",
                             "lens.checkpoint:write_manifest", "1", "before", "--", *EQUIVALENCE_ARGS,
                             f"run.output_root={root}", "--resume"],
                            check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert killed.returncode != 0, killed.stderr[-3000:]
    half = files.checkpoints / ".tmp-step-000003"
    assert sorted(p.name for p in (half / DCP_DIR).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (half / "manifest.json").exists()

    class OneProcess:  # a named stand-in: usable() asks the accelerator only how many processes there are
        num_processes, is_main_process = 1, True

    assert Checkpointer(files.checkpoints, OneProcess(), None, None, None, None, keep=2).usable().name == "step-000002"
    train_two_processes(root, "ddp", "--resume")
    assert [r["step"] for r in read_metrics(files.metrics)] == [1, 2, 3]
    assert not list(files.dir.rglob(".tmp-*"))
    assert_same_tensors(load_file(runs.whole.final / "model.safetensors"), load_file(files.final / "model.safetensors"),
                        "final")


def test_a_checkpoint_that_would_run_code_on_load_is_refused(tmp_path):
    """DCP's `.metadata` is a pickle, which torch 2.13's FileSystemReader unpickles unrestricted, and its
    planner torch.loads non-tensor values with weights_only=False. Ours admit data only."""
    import io
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from lens.checkpoint_sharded import DataOnlyLoadPlanner, load_sharded

    ran = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {ran}",)

    crafted = tmp_path / "step-000001"
    (crafted / DCP_DIR).mkdir(parents=True)
    (crafted / DCP_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"(?s)does not load.*system is not part of a checkpoint.s metadata"):
        load_sharded(crafted, model, torch.optim.AdamW(model.parameters()))
    assert not ran.exists()
    with pytest.raises(AttributeError):  # torch's own reader ran the command, then tripped on its result
        dcp.FileSystemReader(crafted / DCP_DIR).read_metadata()
    assert ran.exists()

    ran.unlink()
    saved = io.BytesIO()
    torch.save(RunsCode(), saved)
    with pytest.raises(pickle.UnpicklingError):
        DataOnlyLoadPlanner(flatten_state_dict=False).load_bytes(None, io.BytesIO(saved.getvalue()))
    assert not ran.exists()
    with pytest.raises(AttributeError):  # torch's planner ran it too, before failing to file the result
        DefaultLoadPlanner(flatten_state_dict=False).load_bytes(None, io.BytesIO(saved.getvalue()))
    assert ran.exists()

    with pytest.raises(pickle.UnpicklingError, match="torch.serialization.load is not part"):
        MetadataUnpickler(io.BytesIO(pickle.dumps(torch.load))).load()
    # A dotted name (protocol 4) would reach any attribute of an allowed name: torch.float32.__class__ ...
    dotted = b"\x80\x04\x8c\x05torch\x8c\x11float32.__class__\x93."
    with pytest.raises(pickle.UnpicklingError, match="float32.__class__ is not part"):
        MetadataUnpickler(io.BytesIO(dotted)).load()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """In this process: an uninterrupted 3-step run, and one stopped after 2 steps (whole-format checkpoints)."""
    return one_process_runs(tmp_path_factory)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_a_one_process_checkpoint_resumes_in_two_processes(one_process, backend, tmp_path):
    """The whole format, read by rank 0 and broadcast (under FSDP each rank keeps its shard). The third step
    then runs in two processes, so it matches the one-process run to float rounding, not bit for bit."""
    root = tmp_path / "run"
    shutil.copytree(one_process / "stopped", root)
    files, whole = RunFiles(root / "tiny" / "lens"), RunFiles(one_process / "whole" / "tiny" / "lens")
    assert (files.checkpoints / "step-000002" / "optimizer.pt").exists()
    train_two_processes(root, backend, "--resume")
    rows, expected = read_metrics(files.metrics), read_metrics(whole.metrics)
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["train/loss"] for r in rows[:2]] == \
           [r["train/loss"] for r in expected[:2]]
    for key in ("train/acc", "train/response_len_mean", "train/lr"):  # sampled from the restored policy
        assert rows[2][key] == expected[2][key], key
    for key in ("train/loss", "train/entropy", "train/grad_norm"):
        assert rows[2][key] == pytest.approx(expected[2][key], rel=RTOL_TRAIN, abs=1e-9), key
    probe = [f"Q: {i}+{j}=?\nA: \\boxed{{{i + j}}}" for i, j in [(1, 2), (3, 4), (12, 30)]]
    diff = (probe_logprobs(files.final, probe) - probe_logprobs(whole.final, probe)).abs().max().item()
    assert diff <= ATOL_LOGPROB, diff
    assert (files.checkpoints / "step-000003" / DCP_DIR).is_dir()  # and the next checkpoint is sharded
