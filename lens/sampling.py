"""A step's sampled batches (`RolloutBatch`, `ScoredBatch`: what lens.train's phases pass on), what the update
trains on, and dynamic sampling.

Dynamic sampling (DAPO: Yu et al. 2025, arXiv:2503.14476, Sec. 3.2), `train.dynamic_sampling`: a group
whose rewards are all equal (all correct or all wrong) is dropped and more questions are drawn until the step
holds train.prompts_per_step groups, for at most train.dynamic_sampling_max_rounds generation rounds; then the
step trains on what it kept. It sits in front of any estimator (every estimator works group by group).

Extra draws come from a stream of their own per (run.seed, step, draw), so the main data order is untouched
and a resumed run redraws them identically. The stop rule and the truncation use counts reduced over
processes, so every rank runs the same rounds and trains on the same number of groups: no DDP or FSDP
collective waits for a rank that has nothing left to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from lens.data import Problem
from lens.estimators.groups import group_masks
from lens.rollout import Rollout

if TYPE_CHECKING:
    from lens.scoring import RewardStream

log = logging.getLogger(__name__)

_DRAW_STREAM = 0xD5  # a 4-word seed, [seed, step, draw, this]: never the data order's [seed, epoch]


@dataclass
class RolloutBatch:
    step: int
    problems: list[Problem]            # this process's questions, one per group
    prompts: list[str]
    rollouts: list[Rollout]            # len(problems) * G, grouped by question
    seconds: float
    rewards: RewardStream | None = None  # their verification, under way since generation (lens.scoring)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.completion_ids) for r in self.rollouts)


@dataclass
class ScoredBatch:
    batch: RolloutBatch
    correct: torch.Tensor              # [P, G] verifier rewards in {0, 1}
    mean_logprob: torch.Tensor         # [P, G] mean token log-prob under pi_old (LENS's log p-bar)
    advantages: torch.Tensor           # [P, G]; each rollout's token mean when given per token
    verify_seconds: float
    verify_stats: dict = field(default_factory=dict)
    # pi_old per token of each rollout when train.recompute_old_logprobs (the trainer's forward pass, once
    # per rollout batch); None: the engine's log-probs are pi_old.
    old_logprobs: list[torch.Tensor] | None = None
    token_advantages: list[torch.Tensor] | None = None   # one per completion token of each rollout, if per token
    trained: torch.Tensor | None = None  # [P] groups the update uses (dynamic sampling; None: all)
    sampling_rounds: int = 1           # generation rounds that made this batch
    verify_busy_seconds: float = 0.0   # the verifier's working time (verify_seconds: what the step waited)
    verify_streamed: int = 0           # rollouts handed to the verifier before generation ended


def zero_variance(correct: torch.Tensor) -> torch.Tensor:
    """[P] True where a group's rewards are all equal (all correct or all wrong): no GRPO signal."""
    all_correct, all_wrong, _ = group_masks(correct)
    return all_correct | all_wrong


def extra_problems(problems: list[Problem], seed: int, step: int, draw: int, count: int,
                   drawn: set[str]) -> list[Problem]:
    """The `draw`-th (>= 1) extra draw of step `step`, all ranks' together: `count` questions the step has not
    drawn yet (when fewer are left, any questions), from a generator seeded by (seed, step, draw) only."""
    rng = np.random.default_rng([seed, step, draw, _DRAW_STREAM])
    fresh = [i for i, p in enumerate(problems) if p.id not in drawn]
    pool = fresh if len(fresh) >= count else list(range(len(problems)))
    return [problems[i] for i in rng.choice(pool, size=count, replace=len(pool) < count)]


def fill_batch(trainer, first: ScoredBatch) -> ScoredBatch:
    """`first` (the step's scored batch) plus extra rounds while some rank holds fewer than its share of groups
    with signal, merged; `trained` marks the groups the update uses (the first ones with signal, as many on
    every rank), and the advantages of all others are set to 0, as the update sees them."""
    tp, world, step = trainer.params.train, trainer.world, first.batch.step
    target = tp.prompts_per_step // world
    parts = [first]
    drawn = {p.id for p in trainer.step_problems(step, all_ranks=True)}

    def kept() -> int:
        return sum(int((~zero_variance(p.correct)).sum()) for p in parts)

    while len(parts) < tp.dynamic_sampling_max_rounds and _min_over_ranks(trainer, kept()) < target:
        chosen = extra_problems(trainer.problems, trainer.params.run.seed, step, len(parts), tp.prompts_per_step,
                                drawn)
        drawn.update(p.id for p in chosen)
        batch = trainer.generate(step, chosen[trainer.rank::world], draw=len(parts))
        parts.append(trainer.score(batch, check_health=False))
    merged = concat(parts)
    keep = ~zero_variance(merged.correct)
    common = min(_min_over_ranks(trainer, int(keep.sum())), target)
    trained = keep & (keep.cumsum(0) <= common)
    if common < target:
        log.warning("step %d: dynamic sampling kept %d of train.prompts_per_step=%d groups with signal after %d "
                    "rounds (train.dynamic_sampling_max_rounds=%d): %s", step, common * world, tp.prompts_per_step,
                    len(parts), tp.dynamic_sampling_max_rounds,
                    "training on them" if common else "no update this step")
    G = merged.correct.shape[1]
    token_adv = None if merged.token_advantages is None else [
        a if trained[k // G] else torch.zeros_like(a) for k, a in enumerate(merged.token_advantages)]
    return replace(merged, advantages=torch.where(trained[:, None], merged.advantages, 0.0),
                   token_advantages=token_adv, trained=trained, sampling_rounds=len(parts))


def concat(parts: list[ScoredBatch]) -> ScoredBatch:
    """Scored batches of one step as one (groups in order; prompt indices shifted to the merged lists)."""
    if len(parts) == 1:
        return parts[0]
    problems, prompts, rollouts = [], [], []
    for part in parts:
        rollouts += [replace(r, prompt_index=r.prompt_index + len(problems)) for r in part.batch.rollouts]
        problems += part.batch.problems
        prompts += part.batch.prompts
    first = parts[0]

    def joined(name: str) -> list | None:
        return None if getattr(first, name) is None else [x for p in parts for x in getattr(p, name)]

    batch = replace(first.batch, problems=problems, prompts=prompts, rollouts=rollouts,
                    seconds=sum(p.batch.seconds for p in parts))
    return replace(first, batch=batch, correct=torch.cat([p.correct for p in parts]),
                   mean_logprob=torch.cat([p.mean_logprob for p in parts]),
                   advantages=torch.cat([p.advantages for p in parts]),
                   verify_seconds=sum(p.verify_seconds for p in parts),
                   verify_busy_seconds=sum(p.verify_busy_seconds for p in parts),
                   verify_streamed=sum(p.verify_streamed for p in parts),
                   verify_stats={k: sum(p.verify_stats.get(k, 0) for p in parts) for k in first.verify_stats},
                   old_logprobs=joined("old_logprobs"), token_advantages=joined("token_advantages"))


def training_set(scored: ScoredBatch) -> tuple[list[Rollout], torch.Tensor | list[torch.Tensor],
                                               list[torch.Tensor] | None]:
    """What the update trains on: the rollouts of the trained groups (all without dynamic sampling), their
    advantages (flat [N], or one tensor per rollout when per token) and pi_old per token (None: the engine's)."""
    adv = scored.advantages.flatten() if scored.token_advantages is None else scored.token_advantages
    if scored.trained is None:
        return scored.batch.rollouts, adv, scored.old_logprobs
    keep = scored.trained.repeat_interleave(scored.correct.shape[1]).nonzero().flatten().tolist()

    def pick(xs):
        return None if xs is None else [xs[k] for k in keep]

    return pick(scored.batch.rollouts), adv[keep] if torch.is_tensor(adv) else pick(adv), pick(scored.old_logprobs)


def _min_over_ranks(trainer, count: int) -> int:
    if trainer.world == 1:
        return count
    return int(trainer.accelerator.gather(torch.tensor([count], device=trainer.accelerator.device)).min())
