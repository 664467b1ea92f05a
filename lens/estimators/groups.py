"""Group bookkeeping shared by estimators and step statistics: input checks and group kinds."""

from __future__ import annotations

from typing import NamedTuple

import torch


class GroupStats(NamedTuple):
    frac_all_correct: float
    frac_all_wrong: float
    frac_mixed: float


def check_correct(correct: torch.Tensor) -> torch.Tensor:
    """`correct` as float64 after checking it is [num_groups, G >= 2] of binary rewards."""
    if correct.dim() != 2:
        raise ValueError(f"correct must have shape [num_groups, G], got {tuple(correct.shape)}")
    if correct.shape[1] < 2:
        raise ValueError("a group needs at least G = 2 responses")
    r = correct.to(torch.float64)
    if not torch.all((r == 0) | (r == 1)):
        raise ValueError("correct must hold binary rewards (0 or 1)")
    return r


def group_masks(correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean [num_groups] masks: all-correct, all-wrong (negative), mixed."""
    r = check_correct(correct)
    n_correct = r.sum(dim=1)
    all_correct = n_correct == r.shape[1]
    all_wrong = n_correct == 0
    return all_correct, all_wrong, ~(all_correct | all_wrong)


def group_stats(correct: torch.Tensor) -> GroupStats:
    """Fractions of all-correct, all-wrong and mixed groups."""
    all_correct, all_wrong, mixed = group_masks(correct)
    n = max(correct.shape[0], 1)
    return GroupStats(frac_all_correct=all_correct.sum().item() / n, frac_all_wrong=all_wrong.sum().item() / n,
                      frac_mixed=mixed.sum().item() / n)
