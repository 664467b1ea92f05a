"""GRPO (Shao et al. 2024): group-normalised verifier rewards."""

from __future__ import annotations

import torch

from lens.estimators import register
from lens.estimators.groups import check_correct


def grpo_advantages(correct: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), unbiased std as verl computes it.

    scale_std=False gives Dr.GRPO's centring only. All-correct and all-wrong groups get exactly zero.
    """
    r = check_correct(correct)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.to(torch.float32)


@register("grpo", section="grpo", summary="GRPO: group-normalised rewards; all-wrong groups carry no signal")
def grpo(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return grpo_advantages(correct, scale_std=section.scale_std, eps=eps)
