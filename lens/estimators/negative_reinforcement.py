"""NSR and W-REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
Reasoning", arXiv:2506.01347): REINFORCE on rewards +1 / -1 with no group baseline, split into its positive
(PSR) and negative (NSR) sample terms. NSR keeps only the -1 of wrong answers; W-REINFORCE weights the +1
of correct ones by lambda (the paper recommends 0.1). As the authors' code does, the advantage is the
reward itself, not normalised, so every wrong answer gets -1 whatever its group.
"""

from __future__ import annotations

import torch

from lens.estimators import register
from lens.estimators.groups import check_correct


def weighted_reinforce_advantages(correct: torch.Tensor, positive_weight: float) -> torch.Tensor:
    """A_i = positive_weight * r_i - (1 - r_i): +lambda for a correct answer, -1 for a wrong one."""
    r = check_correct(correct)
    return (positive_weight * r - (1.0 - r)).to(torch.float32)


@register("nsr", summary="NSR: only wrong answers are trained on, each with advantage -1 (no baseline)")
def nsr(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return weighted_reinforce_advantages(correct, positive_weight=0.0)


@register("w_reinforce", section="w_reinforce",
          summary="W-REINFORCE: -1 for wrong answers, +lambda for correct ones (no baseline)")
def w_reinforce(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return weighted_reinforce_advantages(correct, positive_weight=section.positive_weight)
