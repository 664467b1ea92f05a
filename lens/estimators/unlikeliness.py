"""Unlikeliness reward (He, Fried, Welleck 2025, "Rewarding the Unlikely: Lifting GRPO Beyond Distribution
Sharpening", arXiv:2506.02355): a correct answer the policy found likely earns less than a correct answer it
found unlikely, r_i = R_i (1 - beta * rank_i / G), rank 0 for the group's least likely answer by mean token
log-prob under pi_old; then GRPO's normalisation. It reshapes mixed groups only: all-wrong groups keep no
signal, and all-correct groups get none (the authors' recipe drops groups without a wrong answer).
"""

from __future__ import annotations

import torch

from lens.estimators import register
from lens.estimators.groups import check_correct, group_masks


def likelihood_ranks(mean_logprob: torch.Tensor) -> torch.Tensor:
    """Rank of each answer within its group, 0 = least likely, G - 1 = most likely, float64 [num_groups, G].

    Tied answers share the mean of their ranks, so the reward does not depend on sample order.
    """
    lp = mean_logprob.detach().to(torch.float64)
    below = (lp.unsqueeze(1) < lp.unsqueeze(2)).sum(dim=2)       # [g, i]: answers less likely than i
    tied = (lp.unsqueeze(1) == lp.unsqueeze(2)).sum(dim=2) - 1    # others as likely as i
    return below.to(torch.float64) + tied.to(torch.float64) / 2.0


def unlikeliness_rewards(correct: torch.Tensor, mean_logprob: torch.Tensor, rank_penalty: float = 0.25) -> torch.Tensor:
    """r_i (1 - rank_penalty * rank_i / G), float64 [num_groups, G]."""
    r = check_correct(correct)
    if mean_logprob.shape != correct.shape:
        raise ValueError(f"mean_logprob shape {tuple(mean_logprob.shape)} != correct shape {tuple(correct.shape)}")
    return r * (1.0 - rank_penalty * likelihood_ranks(mean_logprob) / r.shape[1])


def unlikeliness_advantages(correct: torch.Tensor, mean_logprob: torch.Tensor, rank_penalty: float = 0.25,
                            eps: float = 1e-6) -> torch.Tensor:
    """GRPO's (r' - mean) / (std + eps) of the unlikeliness rewards r'; zero unless the group is mixed."""
    rewards = unlikeliness_rewards(correct, mean_logprob, rank_penalty)
    _, _, mixed = group_masks(correct)
    adv = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)
    return torch.where(mixed.unsqueeze(1), adv, 0.0).to(torch.float32)


@register("unlikeliness", section="unlikeliness",
          summary="Unlikeliness reward: GRPO where unlikely correct answers earn more than likely ones")
def unlikeliness(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return unlikeliness_advantages(correct, mean_logprob, rank_penalty=section.rank_penalty, eps=eps)
