"""Advantage estimators: GRPO and LENS (see shared LENS.md, section "What is actually run").

Every function works on tensors of shape [num_groups, G]: one row per question, one column per sampled
response. `correct` holds the verifier's binary rewards r_i in {0, 1}. The returned advantages are
broadcast to every token of the corresponding response by the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# pbar is exp(mean token log-prob); a response the policy finds astronomically unlikely would underflow
# to 0 and turn D - pbar into 0/0. Clamping at a tiny floor keeps the arithmetic defined without
# changing any realistic value.
_PBAR_FLOOR = 1e-30


class GroupStats(NamedTuple):
    frac_all_correct: float
    frac_all_wrong: float
    frac_mixed: float


def _check_correct(correct: torch.Tensor) -> torch.Tensor:
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
    r = _check_correct(correct)
    n_correct = r.sum(dim=1)
    all_correct = n_correct == r.shape[1]
    all_wrong = n_correct == 0
    return all_correct, all_wrong, ~(all_correct | all_wrong)


def group_stats(correct: torch.Tensor) -> GroupStats:
    """Fractions of all-correct, all-wrong and mixed groups."""
    all_correct, all_wrong, mixed = group_masks(correct)
    n = max(correct.shape[0], 1)
    return GroupStats(
        frac_all_correct=all_correct.sum().item() / n,
        frac_all_wrong=all_wrong.sum().item() / n,
        frac_mixed=mixed.sum().item() / n,
    )


def grpo_advantages(correct: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps), unbiased std as verl computes it.

    scale_std=False gives Dr.GRPO's centring only. All-correct and all-wrong groups get exactly zero.
    """
    r = _check_correct(correct)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.to(torch.float32)


def calibrated_rewards(correct: torch.Tensor, mean_logprob: torch.Tensor) -> torch.Tensor:
    """LENS's calibrated reward r~ (LENS.md steps 1-3), float64, shape [num_groups, G].

    Correct answers keep 1; a wrong answer gets -(1/G) * pbar / (D - pbar), a penalty that grows with
    the policy's confidence pbar in it. D is the difficulty estimate: for a group with at least one
    correct answer max(D_imp, 2 max pbar), else 2 max pbar. All-correct groups have no wrong answer, so
    their r~ is simply 1.
    """
    r = _check_correct(correct)
    if mean_logprob.shape != correct.shape:
        raise ValueError(f"mean_logprob shape {tuple(mean_logprob.shape)} != correct shape {tuple(correct.shape)}")
    G = r.shape[1]
    # Confidence is a constant of the rollout policy: no gradient flows through it.
    pbar = mean_logprob.detach().to(torch.float64).exp().clamp_min(_PBAR_FLOOR)
    two_max_pbar = 2.0 * pbar.max(dim=1, keepdim=True).values
    # D_imp = [ (1/G) sum_i r_i / pbar_i ]^-1, defined only where some r_i = 1.
    inv_mean = (r / pbar).sum(dim=1, keepdim=True) / G
    has_correct = inv_mean > 0
    d_imp = torch.where(has_correct, 1.0 / inv_mean.clamp_min(torch.finfo(torch.float64).tiny), two_max_pbar)
    difficulty = torch.maximum(d_imp, two_max_pbar)
    penalty = (1.0 / G) * pbar / (difficulty - pbar)
    return r - (1.0 - r) * penalty


def lens_advantages(
    correct: torch.Tensor,
    mean_logprob: torch.Tensor,
    alpha: float = 0.25,
    mixed_groups: bool = True,
    negative_groups: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LENS advantages, exactly LENS.md "What is actually run" step 4.

    - mixed group: GRPO normalisation of r~: (r~ - mean) / (std + eps)  [mixed_groups=False: plain GRPO]
    - negative group: alpha * (r~ - mean), centring only, alpha folded in  [negative_groups=False: zero]
    - all-correct group: zero.
    `mean_logprob[g, i]` is response i's mean token log-prob under the rollout (old) policy.
    """
    r = _check_correct(correct)
    all_correct, all_wrong, mixed = group_masks(correct)
    r_tilde = calibrated_rewards(correct, mean_logprob)

    centred = r_tilde - r_tilde.mean(dim=1, keepdim=True)
    lens_mixed = centred / (r_tilde.std(dim=1, keepdim=True) + eps)
    mixed_adv = lens_mixed if mixed_groups else grpo_advantages(r, eps=eps).to(torch.float64)
    negative_adv = alpha * centred if negative_groups else torch.zeros_like(centred)

    adv = torch.zeros_like(r)
    adv = torch.where(mixed.unsqueeze(1), mixed_adv, adv)
    adv = torch.where(all_wrong.unsqueeze(1), negative_adv, adv)
    adv = torch.where(all_correct.unsqueeze(1), torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


def compute_advantages(
    algo: str,
    correct: torch.Tensor,
    mean_logprob: torch.Tensor,
    *,
    scale_std: bool = True,
    eps: float = 1e-6,
    alpha: float = 0.25,
    mixed_groups: bool = True,
    negative_groups: bool = True,
) -> torch.Tensor:
    """Dispatch on `train.algo`."""
    if algo == "grpo":
        return grpo_advantages(correct, scale_std=scale_std, eps=eps)
    if algo == "lens":
        return lens_advantages(correct, mean_logprob, alpha=alpha, mixed_groups=mixed_groups,
                               negative_groups=negative_groups, eps=eps)
    raise ValueError(f"train.algo: unknown algorithm {algo!r} (expected 'grpo' or 'lens')")
