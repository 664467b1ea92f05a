"""Log-probs of the completion tokens without materialising [B, T, V] logits (`train.logprob_chunk_tokens`).

Hooks on the model's output embedding (its lm_head) take the final hidden states, keep the completion
positions only (a target of the loss mask, the last prompt position included) and apply the head to
`chunk_tokens` positions at a time; each chunk is recomputed in the backward pass (activation
checkpointing), so at most one chunk's logits exist in either pass. The head's result is returned as the
model's `logits` output, so the forward and its gradient run through the model (and any DDP/FSDP wrapper,
whose hooks see every use of the weights) as the plain path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lens.loss import token_logprobs_and_entropy

# Models that transform the head's logits before returning them: the hooks would skip that step.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale")


def completion_logprobs(model, input_ids: torch.Tensor, attention: torch.Tensor, loss_mask: torch.Tensor,
                        temperature: float, chunk_tokens: int, with_entropy: bool = False, unwrapped=None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [B, T-1], entropy [B, T-1] or None), 0 outside `loss_mask`; the values the full logits give.

    `model` (a Hugging Face causal LM) is called as is, a DDP/FSDP wrapper included; `unwrapped`: the model
    inside such a wrapper (None: `model` itself), whose output embedding is hooked.
    """
    unwrapped = model if unwrapped is None else unwrapped
    for name in _LOGIT_POSTPROCESSING:
        if getattr(unwrapped.config, name, None) not in (None, 1.0):
            raise ValueError(f"train.logprob_chunk_tokens: the model post-processes its logits ({name}="
                             f"{getattr(unwrapped.config, name)}); set train.logprob_chunk_tokens=null")
    head = unwrapped.get_output_embeddings()
    if head is None:
        raise ValueError(f"train.logprob_chunk_tokens: {type(unwrapped).__name__} has no output embedding to hook")
    selected = loss_mask.bool()
    targets = input_ids[:, 1:][selected]
    captured: dict[str, torch.Tensor] = {}

    def keep_hidden(module, args):  # the head then runs on zero positions: its own logits cost nothing
        captured["hidden"] = args[0][:, :-1][selected]
        return (args[0][:, :0],)

    def chunked_head(module, args, output):
        logp, entropy = chunked_logprobs(captured.pop("hidden"), module.weight, getattr(module, "bias", None),
                                         targets, temperature, chunk_tokens, with_entropy)
        captured["entropy"] = entropy
        return logp

    handles = [head.register_forward_pre_hook(keep_hidden), head.register_forward_hook(chunked_head)]
    try:
        packed = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    logp = torch.zeros(loss_mask.shape, dtype=packed.dtype, device=packed.device).masked_scatter(selected, packed)
    entropy = captured.get("entropy")
    if entropy is not None:
        entropy = torch.zeros(loss_mask.shape, dtype=entropy.dtype, device=entropy.device).masked_scatter(
            selected, entropy)
    return logp, entropy


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     temperature: float, chunk_tokens: int, with_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H] -> log p(targets) [N] (and entropy [N], no gradient) through the head, chunk by chunk."""
    logps, entropies = [], []
    for start in range(0, max(hidden.shape[0], 1), chunk_tokens):  # no completion token: still in the graph
        args = (hidden[start:start + chunk_tokens], weight, bias, targets[start:start + chunk_tokens],
                temperature, with_entropy)
        if torch.is_grad_enabled():  # backward recomputes this chunk's logits instead of keeping them
            logp, entropy = checkpoint(_head_logprobs, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            logp, entropy = _head_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def _head_logprobs(hidden, weight, bias, targets, temperature, with_entropy):
    return token_logprobs_and_entropy(F.linear(hidden, weight, bias), targets, temperature, with_entropy)
