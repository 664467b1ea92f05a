"""LENS's per-token penalty (`train.lens.penalty=token`) through the real trainer: the estimator registry's
per-token hook, `collate`'s [B, T-1] advantages, the update; and the default path left exactly as it was.

The only fake is the verifier's test hook `Verifier(scorer=...)` (tests/test_reward_health.py), a scorer
that makes some groups mixed, which a random tiny policy never does by itself.
"""

from __future__ import annotations

import math
import time
import zlib

import pytest
import torch

from lens import estimators
from lens.collate import collate
from lens.estimators import compute_advantages, compute_token_advantages
from lens.estimators.lens_token import token_advantages_for_rollouts
from lens.params import TrainParams
from lens.rollout import Rollout
from lens.train import Trainer
from tests.helpers import model_weights, random_policy, small_params, synthetic_data, trainer_scoring_with

TOKEN = ["train.algo=lens", "train.lens.penalty=token"]


def half_mixed(completion: str, gold: str) -> float:
    """Test scorer: wrong on every answer to half the questions (by gold), else by the completion's parity."""
    return 0.0 if zlib.crc32(gold.encode()) % 2 else float(len(completion) % 2 == 0)


def _trainer(tmp_path, *extra, scorer=None) -> Trainer:
    params = small_params(tmp_path, *extra)
    random_policy(params)
    synthetic_data(params)
    return trainer_scoring_with(params, scorer)


_weights = model_weights


def test_a_trainer_step_with_the_per_token_penalty_trains_on_per_token_advantages(tmp_path):
    trainer = _trainer(tmp_path, *TOKEN)
    try:
        before = _weights(trainer)
        scored = trainer.score(trainer.rollout(0))
        rollouts = scored.batch.rollouts
        assert scored.correct.sum() == 0  # a random policy: every group negative, LENS's case
        assert [len(a) for a in scored.token_advantages] == [len(r.completion_ids) for r in rollouts]
        # Per token: within an answer the advantages follow each token's own pi_old, so they differ.
        assert any(len(set(a.tolist())) > 1 for a in scored.token_advantages)
        means = torch.tensor([a.double().mean().item() for a in scored.token_advantages], dtype=torch.float32)
        assert torch.equal(scored.advantages.flatten(), means)  # the [P, G] record: each rollout's token mean
        batch = trainer._collate(rollouts, scored.token_advantages, [0, 1], scored.old_logprobs)
        assert batch.advantages.shape == batch.loss_mask.shape  # [B, T-1] reaches the loss
        metrics = trainer.complete_step(scored, time.perf_counter())
        assert trainer.state.updates == 2 and metrics["train/grad_norm"] > 0
        assert metrics["train/frac_samples_with_signal"] > 0.9
        assert any(not torch.equal(before[k], v) for k, v in _weights(trainer).items())
    finally:
        trainer.close()


def test_the_per_token_advantages_use_pi_old_from_the_trainer_when_it_recomputes_it(tmp_path):
    trainer = _trainer(tmp_path, *TOKEN, "train.recompute_old_logprobs=true")
    try:
        batch = trainer.rollout(0)
        for r in batch.rollouts:  # corrupt the engine's log-probs: they must not be what the penalty reads
            r.logprobs = [-1.0] * len(r.logprobs)
        scored = trainer.score(batch)
        expected = token_advantages_for_rollouts(scored.correct, scored.old_logprobs, trainer.params.train.lens,
                                                 trainer.params.train.adv_eps)
        assert all(torch.equal(a, e) for a, e in zip(scored.token_advantages, expected, strict=True))
        assert any(len(set(a.tolist())) > 1 for a in scored.token_advantages)
    finally:
        trainer.close()


def test_with_every_token_of_an_answer_at_one_probability_per_token_is_per_sequence(tmp_path):
    trainer = _trainer(tmp_path, *TOKEN, scorer=half_mixed)
    try:
        batch = trainer.rollout(0)
        for r in batch.rollouts:  # each answer's tokens all at its mean log-prob
            r.logprobs = [sum(r.logprobs) / len(r.logprobs)] * len(r.logprobs)
        scored = trainer.score(batch)
        mixed = (scored.correct.sum(1) > 0) & (scored.correct.sum(1) < scored.correct.shape[1])
        assert mixed.any() and (~mixed).any()  # both kinds of group are compared
        per_sequence = compute_advantages(TrainParams(algo="lens"), scored.correct, scored.mean_logprob).flatten()
        for a, seq in zip(scored.token_advantages, per_sequence, strict=True):
            assert torch.allclose(a, seq.expand_as(a), rtol=1e-5, atol=1e-7)
        assert per_sequence.abs().sum() > 0
    finally:
        trainer.close()


def test_the_registry_hook_answers_per_token_only_for_the_token_penalty():
    correct = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logprobs = [[math.log(0.5)], [math.log(0.9), math.log(0.3)], [math.log(0.2)], [math.log(0.4), math.log(0.8)]]
    assert compute_token_advantages(TrainParams(algo="lens"), correct, logprobs) is None
    assert compute_token_advantages(TrainParams(algo="grpo"), correct, logprobs) is None
    out = compute_token_advantages(TrainParams(algo="lens", lens={"penalty": "token"}), correct, logprobs)
    assert [o.shape[0] for o in out] == [1, 2, 1, 2]
    # compute_advantages alone still cannot: it says which key and where the per-token path is.
    with pytest.raises(ValueError, match=r"train\.lens\.penalty='token'.*compute_token_advantages"):
        compute_advantages(TrainParams(algo="lens", lens={"penalty": "token"}), correct, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="already has a per-token hook"):
        estimators.register_token_advantages("lens")(lambda *args: None)


def test_collate_places_per_token_advantages_on_the_completion_targets():
    # Prompt lengths 3 and 1, completions 2 and 4 tokens: targets of the completion sit at [p - 1, p - 1 + c).
    rollouts = [Rollout(0, [5, 6, 7], [8, 9], "ab", [-0.1, -0.2], False),
                Rollout(1, [5], [8, 9, 10, 11], "abcd", [-0.3, -0.4, -0.5, -0.6], False)]
    adv = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0])]
    old = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0, -6.0])]
    b = collate(rollouts, adv, [1, 0], pad_id=0, device="cpu", old_logprobs=old)
    assert b.advantages.shape == (2, 4)
    assert torch.equal(b.advantages, torch.tensor([[3.0, 4.0, 5.0, 6.0], [0.0, 0.0, 1.0, 2.0]]))
    assert torch.equal(b.advantages != 0, b.loss_mask.bool())  # exactly the loss's tokens, as pi_old is
    assert torch.equal(b.old_logprobs, -b.advantages)
    # Per sequence stays [B], in idx order.
    assert torch.equal(collate(rollouts, torch.tensor([7.0, 8.0]), [1, 0], 0, "cpu").advantages,
                       torch.tensor([8.0, 7.0]))


def _two_steps(root, *extra, monkeypatch=None, remove_hook=False) -> dict[str, torch.Tensor]:
    trainer = _trainer(root, "train.algo=lens", *extra)
    try:
        if remove_hook:  # the trainer as it was before the hook: per-sequence advantages only
            monkeypatch.delitem(estimators._TOKEN_HOOKS, "lens")
        for _ in range(2):
            trainer.train_step()
        return _weights(trainer)
    finally:
        trainer.close()


def test_the_default_per_sequence_path_is_unchanged_bit_for_bit(tmp_path, monkeypatch):
    default = _two_steps(tmp_path / "default")
    without_hook = _two_steps(tmp_path / "no-hook", "train.lens.penalty=sequence", monkeypatch=monkeypatch,
                              remove_hook=True)
    monkeypatch.undo()
    token = _two_steps(tmp_path / "token", "train.lens.penalty=token")
    assert all(torch.equal(default[k], without_hook[k]) for k in default)
    assert any(not torch.equal(default[k], token[k]) for k in default)  # the comparison can tell a change
