"""The RL trainer: metrics, checkpoints and NaN handling (kills and resumes: tests/test_crash_resume.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lens import stages
from lens.train import NonFiniteLossError, Trainer
from tests.helpers import random_policy, small_params, synthetic_data

CORE_METRICS = [
    "train/reward_mean", "train/acc", "train/frac_groups_all_correct", "train/frac_groups_all_wrong",
    "train/frac_groups_mixed", "train/frac_samples_with_signal", "train/loss", "train/clip_frac", "train/kl",
    "train/entropy", "train/response_len_mean", "train/truncated_frac", "train/skipped_steps",
    "perf/rollout_tok_s", "perf/train_tok_s", "perf/step_s", "perf/mem_peak_gib", "perf/verify_busy_s",
    "verify/streamed_frac",
]


def _setup(tmp_path, *extra):
    params = small_params(tmp_path, *extra)
    random_policy(params)
    synthetic_data(params)
    return params


def test_lens_training_writes_metrics_rollouts_checkpoints_and_final_model(tmp_path):
    params = _setup(tmp_path, "train.algo=lens", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    summary = stages.train(params)
    out = params.algo_dir("lens")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in CORE_METRICS:
        assert key in rows[-1], key
    # A random policy fails everything: all groups negative; LENS still gives every sample a signal.
    assert rows[0]["train/frac_groups_all_wrong"] == 1.0
    assert rows[0]["train/frac_samples_with_signal"] > 0.9
    assert summary["done"] and (out / "final" / "model.safetensors").exists()
    assert not list((out / "final").glob("*.bin"))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000003"]  # keep_checkpoints=1 pruned step 2
    assert (out / "checkpoints" / "latest").read_text() == "step-000003"
    import pyarrow.parquet as pq

    table = pq.read_table(out / "rollouts" / "step-000000.parquet").to_pydict()
    assert len(table["completion"]) == params.train.prompts_per_step * params.rollout.group_size
    assert set(table) >= {"problem_id", "level", "completion", "reward", "mean_logprob", "advantage"}


def test_memory_is_logged_around_each_phase(tmp_path, caplog):
    params = _setup(tmp_path, "train.steps=1")
    trainer = Trainer(params)
    try:
        with caplog.at_level("DEBUG", logger="lens.train"):
            metrics = trainer.train_step()
    finally:
        trainer.close()
    lines = [r.getMessage() for r in caplog.records if "memory" in r.getMessage()]
    for phase in ("generate_rollouts", "verify_rollouts", "update_policy"):
        assert any(f"step 1 {phase}: memory before rss" in m for m in lines), lines
        assert any(f"step 1 {phase}: memory after rss" in m for m in lines), lines
    assert 0.05 < metrics["perf/mem_peak_gib"] < 64  # the process's high-water mark, in GiB


def test_grpo_on_all_negative_groups_has_no_signal_and_does_not_move_the_weights(tmp_path):
    params = _setup(tmp_path, "train.algo=grpo", "train.steps=1")
    before = load_file(params.warm_start_dir / "model" / "model.safetensors")
    stages.train(params)
    after = load_file(params.algo_dir("grpo") / "final" / "model.safetensors")
    row = json.loads((params.algo_dir("grpo") / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train/frac_groups_all_wrong"] == 1.0 and row["train/frac_samples_with_signal"] == 0.0
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_loss_skips_the_update_then_stops_the_run(tmp_path, monkeypatch):
    params = _setup(tmp_path, "train.algo=lens", "train.max_consecutive_nonfinite=2", "train.steps=3",
                    "train.mini_batch_size=16")  # one update per step
    real = Trainer.compute_loss
    calls = {"n": 0}

    def nan_loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan"))

    trainer = Trainer(params)
    try:
        monkeypatch.setattr(Trainer, "compute_loss", nan_loss)
        before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
        metrics = trainer.train_step()
        assert metrics["train/skipped_steps"] == 1 and trainer.state.updates == 0
        assert all(torch.equal(before[k], v) for k, v in trainer.unwrapped_model.state_dict().items())
        with pytest.raises(NonFiniteLossError, match="consecutive"):
            trainer.train_step()
        # Back to a finite loss: the counter of consecutive failures resets.
        monkeypatch.setattr(Trainer, "compute_loss", real)
        trainer.state.consecutive_nonfinite = 0
        trainer.train_step()
        assert trainer.state.updates == 1 and trainer.state.skipped_updates == 2
    finally:
        trainer.close()


def test_an_update_moves_the_policy_towards_positive_advantages(tmp_path):
    """On its own batch, one small update raises sum_i A_i * mean-logp_i (first order, any optimiser)."""
    params = _setup(tmp_path, "train.algo=grpo", "train.lr=1e-5", "train.mini_batch_size=16")
    trainer = Trainer(params)
    try:
        scored = trainer.score(trainer.rollout(0))
        # A random policy never answers right: give the batch synthetic rewards so GRPO has a signal.
        correct = torch.zeros_like(scored.correct)
        correct[:, 0] = 1
        scored.correct = correct
        scored.advantages = torch.where(correct == 1, 1.0, -1.0 / 3)
        rollouts, adv = scored.batch.rollouts, scored.advantages.flatten()

        def objective():
            ids, att, mask, _, a, _ = trainer._collate(rollouts, adv, list(range(len(rollouts))))
            with torch.no_grad():
                lp, _ = trainer._logprobs(trainer.model, ids, att)
            return (a * (lp * mask).sum(1) / mask.sum(1)).sum().item()

        before = objective()
        metrics = trainer.update(scored)
        assert trainer.state.updates == 1 and metrics["train/grad_norm"] > 0
        assert objective() > before
    finally:
        trainer.close()


@pytest.mark.parametrize("fsdp2, overrides, message", [
    (False, [], "FSDP version 1 is not supported"),
    (True, ["train.kl_beta=0.01"], "train.kl_beta > 0 is not supported under FSDP"),
    (True, ["eval.every_steps=2"], "eval.every_steps is not supported under FSDP with rollout.engine=hf"),
])
def test_unsupported_fsdp_setups_are_refused_with_the_reason(tmp_path, fsdp2, overrides, message):
    from lens.train import check_fsdp_support

    params = small_params(tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        check_fsdp_support(params, fsdp=True, fsdp2=fsdp2)
    check_fsdp_support(params, fsdp=False, fsdp2=False)  # the same settings are fine without FSDP
    check_fsdp_support(small_params(tmp_path), fsdp=True, fsdp2=True)  # the defaults are supported
    # vLLM ranks hold gathered copies of the weights: the engine and the periodic evaluation are fine
    check_fsdp_support(small_params(tmp_path, "rollout.engine=vllm", "eval.every_steps=2"), fsdp=True, fsdp2=True)
