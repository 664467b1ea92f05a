"""NGRPO (Nan et al. 2025, arXiv:2509.18851), advantage calibration: each group's mean and std include
virtual samples of the maximum reward (1 for a binary verifier), so an all-wrong group's answers fall
below its mean and get a negative advantage. The paper's other half, asymmetric clipping, is a loss
setting usable with any estimator: train.clip_low (negative advantages) and train.clip_high (positive),
0.16 and 0.24 in the authors' script.
"""

from __future__ import annotations

import torch

from lens.estimators import register
from lens.estimators.groups import check_correct

MAX_REWARD = 1.0


def ngrpo_advantages(correct: torch.Tensor, virtual_samples: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """(r_i - mean') / (std' + eps), mean' and unbiased std' over the G rewards plus `virtual_samples` 1s.

    All-wrong groups: every answer gets -1 / sqrt(G + 1) (one virtual sample); all-correct groups: 0.
    """
    r = check_correct(correct)
    if virtual_samples < 1:
        raise ValueError(f"train.ngrpo.virtual_samples must be >= 1, got {virtual_samples}")
    augmented = torch.cat([r, torch.full((r.shape[0], virtual_samples), MAX_REWARD, dtype=r.dtype)], dim=1)
    mean, std = augmented.mean(dim=1, keepdim=True), augmented.std(dim=1, keepdim=True)
    return ((r - mean) / (std + eps)).to(torch.float32)


@register("ngrpo", section="ngrpo",
          summary="NGRPO: a virtual correct sample in each group's statistics makes all-wrong groups negative")
def ngrpo(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return ngrpo_advantages(correct, virtual_samples=section.virtual_samples, eps=eps)
