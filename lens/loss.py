"""The clipped policy-gradient loss (GRPO's, unchanged by LENS).

Per token: rho = exp(logp - logp_old); loss_t = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)),
plus beta * k3 KL to a reference policy when beta > 0. Options off by default (the paper uses neither):
dual clip (verl's clip_ratio_c: for A < 0, loss_t <= c |A|) and per-token importance weights (the
truncated weights that correct the rollout engine's log-probs towards the trainer's). Advantages are one per
sequence [B], broadcast to its tokens, or one per token [B, T] (LENS's per-token penalty). Clipping by
advantage sign (NGRPO's asymmetric clipping: eps_pos for A > 0, eps_neg for A < 0) is clip_high = eps_pos,
clip_low = eps_neg: in the pessimistic max only the upper bound can bind when A > 0 and only the lower when
A < 0. Aggregation:
- "seq-mean-token-mean" (the paper's): mean over tokens of each sequence, then mean over sequences;
- "token-mean": mean over every token of the mini-batch (DAPO-style).

Gradient accumulation splits a mini-batch into micro-batches; the mean must still be over the whole
mini-batch, so the caller passes `normalizer` (sequences or tokens in the mini-batch) and sums the
micro-batch losses. Without it the normaliser is the micro-batch's own count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossOutput(NamedTuple):
    loss: torch.Tensor           # scalar, differentiable
    clip_frac: torch.Tensor      # fraction of tokens whose clipped branch is active
    kl: torch.Tensor             # k3 KL to the reference (beta > 0) else k3 KL(old || new), token mean
    pg_loss: torch.Tensor        # policy-gradient part only (detached)
    num_tokens: torch.Tensor


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    log_ratio = logp_ref - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: str = "seq-mean-token-mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    normalizer: float | None = None,
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Shapes: logprobs/old_logprobs/mask [B, T], advantages [B] (one per sequence) or [B, T] (per token)."""
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages shape {tuple(advantages.shape)} is neither [B] nor [B, T] for log-probs "
                         f"{tuple(logprobs.shape)}")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if dual_clip_c is not None:  # a very large ratio on a negative advantage cannot blow the loss up
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -adv * dual_clip_c), token_loss)
    if is_weights is not None:
        token_loss = token_loss * is_weights.detach().to(token_loss.dtype)
    pg_token_loss = token_loss
    if kl_beta > 0:
        token_loss = token_loss + kl_beta * k3_kl(logprobs, ref_logprobs)

    seq_tokens = mask.sum(dim=1)
    if loss_agg == "seq-mean-token-mean":
        per_seq = (token_loss * mask).sum(dim=1) / seq_tokens.clamp_min(1.0)
        loss = per_seq.sum() / (normalizer if normalizer is not None else logprobs.shape[0])
    elif loss_agg == "token-mean":
        loss = (token_loss * mask).sum() / (normalizer if normalizer is not None else seq_tokens.sum().clamp_min(1.0))
    else:
        raise ValueError(f"train.loss_agg: unknown aggregation {loss_agg!r}")

    with torch.no_grad():
        n_tok = mask.sum().clamp_min(1.0)
        clip_frac = ((clipped > unclipped).to(mask.dtype) * mask).sum() / n_tok
        kl_ref = ref_logprobs if ref_logprobs is not None else old_logprobs
        kl = (k3_kl(logprobs, kl_ref) * mask).sum() / n_tok
        pg = (pg_token_loss * mask).sum() / n_tok
    return LossOutput(loss=loss, clip_frac=clip_frac, kl=kl, pg_loss=pg, num_tokens=mask.sum())


def token_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target token under softmax(logits / T), and the entropy of that distribution.

    The rollout engines report log-probs after temperature, so the trainer must divide by the same T or
    the importance ratio is wrong from the first update. Entropy is a diagnostic: no gradient.
    """
    logits = logits.float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropy = logz - (probs * logits).sum(dim=-1)
    return logp, entropy
