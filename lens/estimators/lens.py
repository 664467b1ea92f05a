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


# How D(q) is set on a negative group, where the importance estimate D_imp is undefined (no correct
# answer). Each rule is a factor times the group's largest confidence, so every penalty stays finite and
# depends on relative confidence only (scaling every pbar by c changes nothing). Mixed groups always use
# the paper's max(D_imp, 2 max pbar).
NEGATIVE_DIFFICULTY_RULES = ("twice_max_confidence", "max_confidence_multiple", "most_confident_as_correct")


def negative_difficulty_factor(rule: str, group_size: int, multiple: float = 2.0) -> float:
    """D(q) / max pbar on a negative group.

    - twice_max_confidence (the paper): 2; the most confident wrong answer's penalty is exactly 1/G.
    - max_confidence_multiple: `multiple` (> 1), the paper's factor 2 made a knob; penalties <= 1/((m-1)G).
    - most_confident_as_correct: G, the importance estimate D_imp had the most confident answer been the
      one correct answer ((1/G) * 1/max pbar)^-1; penalties <= 1/((G-1)G), smaller as G grows.
    """
    if rule == "twice_max_confidence":
        return 2.0
    if rule == "max_confidence_multiple":
        if not multiple > 1:
            raise ValueError(f"train.lens.difficulty_multiple must be > 1 (D above every pbar), got {multiple}")
        return float(multiple)
    if rule == "most_confident_as_correct":
        return float(group_size)
    raise ValueError(f"train.lens.negative_difficulty: unknown rule {rule!r} (one of {NEGATIVE_DIFFICULTY_RULES})")


def calibrated_rewards(correct: torch.Tensor, mean_logprob: torch.Tensor,
                       negative_rule: str = "twice_max_confidence", difficulty_multiple: float = 2.0) -> torch.Tensor:
    """LENS's calibrated reward r~ (LENS.md steps 1-3), float64, shape [num_groups, G].

    Correct answers keep 1; a wrong answer gets -(1/G) * pbar / (D - pbar), a penalty that grows with
    the policy's confidence pbar in it. D is the difficulty estimate: for a group with at least one
    correct answer max(D_imp, 2 max pbar), else `negative_difficulty_factor(negative_rule, ...) * max pbar`
    (the paper's 2 max pbar by default). All-correct groups have no wrong answer, so their r~ is simply 1.
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
    if negative_rule != "twice_max_confidence":  # the default path stays the paper's arithmetic, bit for bit
        factor = negative_difficulty_factor(negative_rule, G, difficulty_multiple)
        difficulty = torch.where(has_correct, difficulty, factor * pbar.max(dim=1, keepdim=True).values)
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
    negative_rule: str = "twice_max_confidence",
    difficulty_multiple: float = 2.0,
) -> torch.Tensor:
    """LENS advantages, exactly LENS.md "What is actually run" step 4.

    - mixed group: GRPO normalisation of r~: (r~ - mean) / (std + eps)  [mixed_groups=False: plain GRPO;
      scale_std=False: centring only, in both (a Dr.GRPO-style LENS)]
    - negative group: alpha * (r~ - mean), centring only, alpha folded in  [negative_groups=False: zero]
    - all-correct group: zero.
    `mean_logprob[g, i]` is response i's mean token log-prob under the rollout (old) policy;
    `negative_rule` / `difficulty_multiple` choose D(q) on negative groups (`negative_difficulty_factor`).
    """
    r = check_correct(correct)
    all_correct, all_wrong, mixed = group_masks(correct)
    r_tilde = calibrated_rewards(correct, mean_logprob, negative_rule, difficulty_multiple)

    centred = r_tilde - r_tilde.mean(dim=1, keepdim=True)
    lens_mixed = centred / (r_tilde.std(dim=1, keepdim=True) + eps) if scale_std else centred
    mixed_adv = lens_mixed if mixed_groups else grpo_advantages(r, scale_std=scale_std, eps=eps).to(torch.float64)
    negative_adv = alpha * centred if negative_groups else torch.zeros_like(centred)

    adv = torch.zeros_like(r)
    adv = torch.where(mixed.unsqueeze(1), mixed_adv, adv)
    adv = torch.where(all_wrong.unsqueeze(1), negative_adv, adv)
    adv = torch.where(all_correct.unsqueeze(1), torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


def section_kwargs(section) -> dict:
    """lens_advantages' keyword arguments from a `train.lens` section (LensParams)."""
    return dict(alpha=section.alpha, mixed_groups=section.mixed_groups, negative_groups=section.negative_groups,
                scale_std=section.scale_std, negative_rule=section.negative_difficulty,
                difficulty_multiple=section.difficulty_multiple)


@register("lens", section="lens", summary="LENS: confidence-weighted penalties make all-wrong groups carry signal")
def lens(correct: torch.Tensor, mean_logprob: torch.Tensor, section, eps: float) -> torch.Tensor:
    if section.penalty != "sequence":
        # One value per response is all this contract carries; the per-token penalty needs every token's
        # pi_old: the trainer gets it from the per-token hook (lens.estimators.lens_token) before this.
        raise ValueError(f"train.lens.penalty={section.penalty!r} needs per-token log-probs, which "
                         "compute_advantages does not carry: use lens.estimators.compute_token_advantages")
    return lens_advantages(correct, mean_logprob, eps=eps, **section_kwargs(section))
