"""LENS with the penalty per token (`train.lens.penalty=token`): each token of a wrong answer is penalised
by its own old-policy probability instead of the answer's length-normalised confidence pbar.

The estimator contract carries one mean log-prob per response, so this is the `lens` estimator's per-token
hook (`register_token_advantages`): the trainer asks it first with every token's pi_old and hands the loss
[B, T] advantages (docs/ALGORITHMS.md, "Per-token advantages in the trainer"). With every token of a
response at the same probability it is exactly the per-sequence LENS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lens.estimators import register_token_advantages
from lens.estimators.groups import check_correct, group_masks
from lens.estimators.grpo import grpo_advantages
from lens.estimators.lens import _PBAR_FLOOR, negative_difficulty_factor, section_kwargs


def token_calibrated_rewards(correct: torch.Tensor, token_logprobs: torch.Tensor, mask: torch.Tensor,
                             negative_rule: str = "twice_max_confidence",
                             difficulty_multiple: float = 2.0) -> torch.Tensor:
    """r~ per token, float64 [num_groups, G, T] (0 on padding).

    r~_{i,t} = r_i - (1 - r_i) (1/G) p_{i,t} / (D - p_{i,t}), p_{i,t} = pi_old(o_{i,t} | ...). D is the
    sequence rule with token confidences in place of pbar where it takes a maximum (every penalised p
    must stay below D): mixed groups max(D_imp, 2 max_{j,t} p_{j,t}), D_imp still from the responses'
    pbar (it estimates 1 / |correct answers|, a property of whole answers); negative groups the
    `negative_rule` factor times max_{j,t} p_{j,t}.
    """
    r = check_correct(correct)
    if token_logprobs.shape[:2] != correct.shape or mask.shape != token_logprobs.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} must be "
                         f"[num_groups, G, T] for correct {tuple(correct.shape)}")
    G = r.shape[1]
    valid = mask.to(torch.bool)
    lp = torch.where(valid, token_logprobs.detach().to(torch.float64), 0.0)
    p_tok = lp.exp().clamp_min(_PBAR_FLOOR)
    pbar = (lp.sum(-1) / valid.sum(-1).clamp_min(1)).exp().clamp_min(_PBAR_FLOOR)        # [N, G]
    max_tok = torch.where(valid, p_tok, 0.0).amax(dim=(1, 2)).clamp_min(_PBAR_FLOOR)     # [N]

    inv_mean = (r / pbar).sum(dim=1) / G
    has_correct = inv_mean > 0
    d_imp = torch.where(has_correct, 1.0 / inv_mean.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    factor = negative_difficulty_factor(negative_rule, G, difficulty_multiple)
    difficulty = torch.where(has_correct, torch.maximum(d_imp, 2.0 * max_tok), factor * max_tok)[:, None, None]
    penalty = (1.0 / G) * p_tok / (difficulty - p_tok)
    r_tok = r.unsqueeze(-1)
    return torch.where(valid, r_tok - (1.0 - r_tok) * penalty, 0.0)


def token_advantages(
    correct: torch.Tensor,
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.25,
    mixed_groups: bool = True,
    negative_groups: bool = True,
    eps: float = 1e-6,
    scale_std: bool = True,
    negative_rule: str = "twice_max_confidence",
    difficulty_multiple: float = 2.0,
) -> torch.Tensor:
    """Per-token LENS advantages [num_groups, G, T], float32, 0 on padding.

    The group's mean and std are those of the responses' token-mean r~, so each response counts once,
    as in the seq-mean-token-mean loss; then, as per sequence: mixed (r~_{i,t} - mean) / (std + eps),
    negative alpha (r~_{i,t} - mean), all-correct 0, and the same ablation switches.
    """
    r = check_correct(correct)
    valid = mask.to(torch.bool)
    all_correct, all_wrong, mixed = group_masks(correct)
    r_tok = token_calibrated_rewards(correct, token_logprobs, mask, negative_rule, difficulty_multiple)
    r_seq = r_tok.sum(-1) / valid.sum(-1).clamp_min(1)
    mean = r_seq.mean(dim=1)[:, None, None]
    centred = r_tok - mean
    lens_mixed = centred / (r_seq.std(dim=1)[:, None, None] + eps) if scale_std else centred
    grpo = grpo_advantages(r, scale_std=scale_std, eps=eps).to(torch.float64).unsqueeze(-1).expand_as(centred)
    mixed_adv = lens_mixed if mixed_groups else grpo
    negative_adv = alpha * centred if negative_groups else torch.zeros_like(centred)

    adv = torch.zeros_like(centred)
    adv = torch.where(mixed[:, None, None], mixed_adv, adv)
    adv = torch.where(all_wrong[:, None, None], negative_adv, adv)
    adv = torch.where(all_correct[:, None, None] | ~valid, 0.0, adv)
    return adv.to(torch.float32)


def token_advantages_for_rollouts(correct: torch.Tensor, logprobs: Sequence[Sequence[float] | torch.Tensor],
                                  section, eps: float) -> list[torch.Tensor]:
    """The trainer's entry point: `logprobs[k]` is rollout k's pi_old per completion token (rollouts grouped
    as `correct` [P, G] is, row-major); returns one float32 tensor of advantages per rollout, same lengths."""
    P, G = correct.shape
    if len(logprobs) != P * G:
        raise ValueError(f"{len(logprobs)} rollouts' log-probs for {P} x {G} rewards")
    seqs = [torch.as_tensor(lp, dtype=torch.float64).flatten() for lp in logprobs]
    T = max((len(s) for s in seqs), default=0)
    padded = torch.zeros(P * G, max(T, 1), dtype=torch.float64)
    mask = torch.zeros(P * G, max(T, 1), dtype=torch.bool)
    for k, s in enumerate(seqs):
        padded[k, :len(s)] = s
        mask[k, :len(s)] = True
    adv = token_advantages(correct, padded.view(P, G, -1), mask.view(P, G, -1), eps=eps, **section_kwargs(section))
    flat = adv.view(P * G, -1)
    return [flat[k, :len(s)].clone() for k, s in enumerate(seqs)]


@register_token_advantages("lens")
def lens_token_hook(correct: torch.Tensor, logprobs: Sequence[Sequence[float] | torch.Tensor], section,
                    eps: float) -> list[torch.Tensor] | None:
    """`train.lens.penalty=token`: per-token advantages; the paper's `sequence`: None (one per answer)."""
    return token_advantages_for_rollouts(correct, logprobs, section, eps) if section.penalty == "token" else None
