"""Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783): GRPO without the
division by the group std, so easy and hard questions are not re-weighted. Its other change, dropping the
per-response 1/|o_i| of the loss, is a loss aggregation (train.loss_agg), not an estimator.

Registered apart from grpo.py because the registry lists modules alphabetically and grpo, lens come first.
"""

from __future__ import annotations

import torch

from lens.estimators import register
from lens.estimators.grpo import grpo_advantages


@register("drgrpo", summary="Dr.GRPO: group-centred rewards, no std division; all-wrong groups carry no signal")
def drgrpo(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return grpo_advantages(correct, scale_std=False, eps=eps)
