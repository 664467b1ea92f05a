"""Verification overlapped with generation (lens.scoring, `verify.overlap`): same rewards and counts as
verifying after generation, the work started before generation ended, failures surface in the trainer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lens.rollout import Rollout
from lens.scoring import RewardStream
from lens.verify import Verifier
from tests.helpers import model_weights, random_policy, small_params, synthetic_data, trainer_scoring_with


def _rollout(prompt: int, text: str) -> Rollout:
    return Rollout(prompt_index=prompt, prompt_ids=[1], completion_ids=[2], text=text, logprobs=[-0.5],
                   truncated=False)


GOLDS = ["\\frac{1}{2}", "7", "x^2"]
TEXTS = [["\\boxed{0.5}", "no answer", "\\boxed{1/2}"], ["\\boxed{7}", "\\boxed{8}", "\\boxed{" + "{" * 12 + "7" + "}" * 13],
         ["\\boxed{x^2}", "\\boxed{x**2}", "x\x00 \\boxed{x^2}"]]


@pytest.fixture(scope="module")
def verifier():
    with Verifier(timeout_s=10, workers=1) as v:
        yield v


def test_streamed_groups_get_the_rewards_and_counts_of_one_batch(verifier):
    rollouts = [_rollout(p, t) for p, texts in enumerate(TEXTS) for t in texts]
    expected = verifier.score_batch([r.text for r in rollouts], [GOLDS[r.prompt_index] for r in rollouts])
    expected_stats = verifier.last_batch_stats
    assert 0 < sum(expected) < len(expected) and expected_stats.rejected == 1 and expected_stats.sanitized == 1

    stream = RewardStream(verifier, GOLDS)
    stream.add(rollouts[6:9])           # groups finish in any order
    stream.add(rollouts[0:3])
    scores = stream.result(rollouts)    # the middle group never arrived: verified now
    assert scores.rewards == expected
    assert scores.stats == expected_stats
    assert scores.streamed_items == 6 and scores.busy_s > 0


def test_rollouts_the_engine_streamed_but_did_not_return_are_not_counted(verifier):
    rollouts = [_rollout(p, t) for p, texts in enumerate(TEXTS) for t in texts]
    stream = RewardStream(verifier, GOLDS)
    stream.add([_rollout(r.prompt_index, r.text) for r in rollouts[:3]])  # copies, not the returned objects
    scores = stream.result(rollouts)
    assert scores.stats.calls == len(rollouts) and scores.streamed_items == 0
    assert scores.rewards == verifier.score_batch([r.text for r in rollouts], [GOLDS[r.prompt_index] for r in rollouts])


def test_a_failure_in_the_background_is_raised_by_result():
    v = Verifier(timeout_s=10, workers=1)
    v.close()  # every call now raises
    stream = RewardStream(v, GOLDS)
    stream.add([_rollout(0, "\\boxed{1}")])
    with pytest.raises(Exception, match="closed"):
        stream.result([_rollout(0, "\\boxed{1}")])


def parity_of_length(completion: str, gold: str) -> float:  # noqa: ARG001  (the verifier's test hook)
    time.sleep(0.02)  # slow enough that the first chunks are still being verified while later ones generate
    return float(len(completion) % 2)


def _trainer(root, overlap: bool):
    params = small_params(root, "rollout.batch_size=4", f"verify.overlap={str(overlap).lower()}",
                          "tracking.enabled=false")
    random_policy(params)
    synthetic_data(params)
    return trainer_scoring_with(params, parity_of_length)


@pytest.mark.slow
def test_training_with_overlap_equals_training_without_it(tmp_path):
    """4 prompts of 4 samples, engine batches of 4: 4 chunks a step, each handed to the verifier as it is done.

    The engine's `on_groups` is wrapped to hold generation after the first chunk until the verifier has
    started on it (at most 10 s): the step goes on only if verification runs while generation is under way."""
    rows, weights = {}, {}
    for overlap in (True, False):
        trainer = _trainer(tmp_path / str(overlap), overlap)
        started, generate_ends = threading.Event(), []
        score, generate = trainer.verifier.score_with_stats, trainer.engine.generate

        def recording_score(*a, **k):
            started.set()
            return score(*a, **k)

        def held_generate(prompts, n, sampling, on_groups=None):
            def hand_over(groups):
                on_groups(groups)
                assert started.wait(10), "nothing was verified while the engine was generating"

            started.clear()
            try:
                return generate(prompts, n, sampling, on_groups=hand_over if on_groups else None)
            finally:
                generate_ends.append(started.is_set())

        trainer.verifier.score_with_stats, trainer.engine.generate = recording_score, held_generate
        try:
            rows[overlap] = [trainer.train_step() for _ in range(2)]
            weights[overlap] = model_weights(trainer)
        finally:
            trainer.close()
        assert generate_ends == [overlap] * 2  # verification had begun when generation ended iff overlapped
        assert [r["verify/streamed_frac"] for r in rows[overlap]] == [1.0 if overlap else 0.0] * 2
    for on, off in zip(rows[True], rows[False]):
        same = [k for k in on if k.startswith(("train/", "verify/")) and k != "verify/streamed_frac"]
        assert 0 < on["train/acc"] < 1
        assert {k: on[k] for k in same} == {k: off[k] for k in same}
    for name, tensor in weights[True].items():
        assert torch.equal(tensor, weights[False][name]), name
