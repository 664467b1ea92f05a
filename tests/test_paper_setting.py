"""The paper's training setting on CPU: fp32 master weights with bf16 compute, pi_old recomputed once per
rollout batch (so the clip can fire and LENS's confidence is the trainer's), the engine/trainer mismatch
measured, truncated importance weights and the dual clip as options."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lens.params import ParamsError, load_params
from lens.train import Trainer
from tests.helpers import random_policy, small_params, synthetic_data


def _trainer(tmp_path, *extra) -> Trainer:
    params = small_params(tmp_path, "train.algo=lens", *extra)
    random_policy(params)
    synthetic_data(params)
    return Trainer(params)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def test_half_precision_master_weights_are_refused_naming_the_key(tmp_path):
    params = small_params(tmp_path, "model.dtype=bfloat16")
    with pytest.raises(ParamsError, match=r"model\.dtype=bfloat16.*model\.compute_dtype=bfloat16"):
        Trainer(params)


def test_a_small_lr_update_changes_the_fp32_masters_under_bf16_compute(tmp_path):
    trainer = _trainer(tmp_path, "model.compute_dtype=bfloat16", "train.lr=1e-6", "train.mini_batch_size=16",
                       "train.micro_batch_size=16")
    try:
        assert trainer.compute_dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        scored = trainer.score(trainer.rollout(0))
        assert (scored.advantages != 0).any()  # LENS gives the all-wrong groups of a random policy a signal
        before = _weights(trainer)
        trainer.update(scored)
        after = _weights(trainer)
        changed = sum(int((before[k] != after[k]).sum()) for k in before)
        total = sum(v.numel() for v in before.values())
        # AdamW's first step moves every weight with a gradient by ~lr: far below a bf16 weight's spacing
        # (2^-8 relative), so bf16 masters would keep almost all of them; fp32 masters keep none.
        assert changed / total > 0.9
        assert all(v.dtype == torch.float32 for v in load_file(
            trainer.save_checkpoint() / "model" / "model.safetensors").values())
    finally:
        trainer.close()


def test_recomputed_pi_old_is_taken_once_before_the_advantages_and_the_clip_fires(tmp_path):
    # Two mini-batches per rollout batch and a large lr: the second mini-batch's ratio is far from 1.
    trainer = _trainer(tmp_path, "train.recompute_old_logprobs=true", "train.lr=0.05", "train.mini_batch_size=8",
                       "train.micro_batch_size=4", "train.ppo_epochs=2")
    try:
        scored = trainer.score(trainer.rollout(0))
        assert scored.old_logprobs is not None and len(scored.old_logprobs) == len(scored.batch.rollouts)
        means = torch.tensor([o.double().mean().item() for o in scored.old_logprobs], dtype=torch.float64)
        means = means.view_as(scored.mean_logprob)
        assert torch.allclose(scored.mean_logprob, means)  # LENS's p-bar is the trainer's pi_old
        metrics = trainer.step_metrics(scored) | trainer.update(scored)
        assert trainer.state.updates == 4
        assert metrics["train/clip_frac"] > 0 and metrics["train/kl"] > 0
        # fp32 engine and trainer: the same model computes the same log-probs
        assert metrics["train/rollout_logprob_abs_diff"] < 1e-4 and metrics["train/rollout_trainer_kl"] < 1e-6
    finally:
        trainer.close()


@pytest.mark.parametrize("extra", [[], ["train.rollout_correction=tis", "train.tis_cap=2.0"]])
def test_recompute_on_and_off_agree_at_the_first_update(tmp_path, extra):
    results = {}
    for recompute in (False, True):
        options = [f"train.recompute_old_logprobs={str(recompute).lower()}"] + (extra if recompute else [])
        trainer = _trainer(tmp_path / str(recompute), "train.mini_batch_size=16", "train.micro_batch_size=8",
                           *options)
        try:
            metrics = trainer.update(trainer.score(trainer.rollout(0)))
            results[recompute] = (metrics["train/loss"], _weights(trainer))
        finally:
            trainer.close()
    (loss_off, w_off), (loss_on, w_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, rel=1e-4, abs=1e-7)
    for k in w_off:
        assert torch.allclose(w_on[k], w_off[k], atol=1e-6), k


def test_rollout_correction_needs_the_recomputed_pi_old(tmp_path):
    with pytest.raises(ParamsError, match="rollout_correction"):
        load_params("tiny", [f"run.output_root={tmp_path}", "train.rollout_correction=tis"])


def test_the_dual_clip_is_passed_to_the_loss(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.dual_clip_c=3.0", "train.mini_batch_size=16", "train.micro_batch_size=16")
    seen = []
    import lens.train

    real = lens.train.policy_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["dual_clip_c"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lens.train, "policy_loss", spy)
    try:
        trainer.update(trainer.score(trainer.rollout(0)))
    finally:
        trainer.close()
    assert seen and set(seen) == {3.0}
