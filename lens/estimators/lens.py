"""LENS (Feng et al. 2025, arXiv:2510.08696): confidence-calibrated rewards that give all-wrong groups a
signal. Exactly shared/LENS.md, "What is actually run"; every step of its Sec. 5.1 is one line here."""

from __future__ import annotations

import torch

from lens.estimators import register
from lens.estimators.grpo import grpo_advantages
from lens.estimators.groups import check_correct, group_masks

# pbar is exp(mean token log-prob); a response the policy finds astronomically unlikely would underflow
# to 0 and turn D - pbar into 0/0. Clamping at a tiny floor keeps the arithmetic defined without
# changing any realistic value.
_PBAR_FLOOR = 1e-30


def calibrated_rewards(correct: torch.Tensor, mean_logprob: torch.Tensor) -> torch.Tensor:
    """LENS's calibrated reward r~ (LENS.md steps 1-3), float64, shape [num_groups, G].

    Correct answers keep 1; a wrong answer gets -(1/G) * pbar / (D - pbar), a penalty that grows with
    the policy's confidence pbar in it. D is the difficulty estimate: for a group with at least one
    correct answer max(D_imp, 2 max pbar), else 2 max pbar. All-correct groups have no wrong answer, so
    their r~ is simply 1.
    """
    r = check_correct(correct)
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
    scale_std: bool = True,
) -> torch.Tensor:
    """LENS advantages, exactly LENS.md "What is actually run" step 4.

    - mixed group: GRPO normalisation of r~: (r~ - mean) / (std + eps)  [mixed_groups=False: plain GRPO;
      scale_std=False: centring only, in both (a Dr.GRPO-style LENS)]
    - negative group: alpha * (r~ - mean), centring only, alpha folded in  [negative_groups=False: zero]
    - all-correct group: zero.
    `mean_logprob[g, i]` is response i's mean token log-prob under the rollout (old) policy.
    """
    r = check_correct(correct)
    all_correct, all_wrong, mixed = group_masks(correct)
    r_tilde = calibrated_rewards(correct, mean_logprob)

    centred = r_tilde - r_tilde.mean(dim=1, keepdim=True)
    lens_mixed = centred / (r_tilde.std(dim=1, keepdim=True) + eps) if scale_std else centred
    mixed_adv = lens_mixed if mixed_groups else grpo_advantages(r, scale_std=scale_std, eps=eps).to(torch.float64)
    negative_adv = alpha * centred if negative_groups else torch.zeros_like(centred)

    adv = torch.zeros_like(r)
    adv = torch.where(mixed.unsqueeze(1), mixed_adv, adv)
    adv = torch.where(all_wrong.unsqueeze(1), negative_adv, adv)
    adv = torch.where(all_correct.unsqueeze(1), torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


@register("lens", section="lens", summary="LENS: confidence-weighted penalties make all-wrong groups carry signal")
def lens(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    return lens_advantages(correct, mean_logprob, alpha=section.alpha, mixed_groups=section.mixed_groups,
                           negative_groups=section.negative_groups, eps=eps, scale_std=section.scale_std)
