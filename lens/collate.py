"""Rollouts -> padded training tensors: one micro-batch of prompt+completion sequences with its loss mask,
pi_old, advantages and the engine's log-probs (targets are shifted by one: logits[t] predicts token t+1).
Advantages come one per rollout ([N] -> [B]) or one per completion token (a list of N tensors -> [B, T-1],
placed on the completion's targets as pi_old is, 0 elsewhere)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lens.rollout import Rollout


class MicroBatch(NamedTuple):
    input_ids: torch.Tensor            # [B, T] right-padded prompt + completion
    attention: torch.Tensor            # [B, T]
    loss_mask: torch.Tensor            # [B, T-1] 1 on completion tokens (as targets)
    old_logprobs: torch.Tensor         # [B, T-1] pi_old: recomputed by the trainer when given, else the engine's
    advantages: torch.Tensor           # [B], or [B, T-1] when given per token
    engine_logprobs: torch.Tensor      # [B, T-1] the rollout engine's log-probs


def collate(rollouts: list[Rollout], advantages: torch.Tensor | list[torch.Tensor] | None, idx: list[int], pad_id: int,
            device, old_logprobs: list[torch.Tensor] | None = None) -> MicroBatch:
    """`advantages` None: a forward pass only (zeros; e.g. recomputing pi_old)."""
    if advantages is None:
        advantages = torch.zeros(len(rollouts))
    per_token = isinstance(advantages, (list, tuple))
    seqs = [rollouts[i].prompt_ids + rollouts[i].completion_ids for i in idx]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(idx), width), dtype=torch.long)
    loss_mask = torch.zeros((len(idx), width - 1))
    engine_lp = torch.zeros((len(idx), width - 1))
    old_lp = engine_lp if old_logprobs is None else torch.zeros((len(idx), width - 1))
    adv = torch.zeros((len(idx), width - 1)) if per_token else advantages[idx]
    for row, (i, seq) in enumerate(zip(idx, seqs)):
        r = rollouts[i]
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        start, end = len(r.prompt_ids) - 1, len(seq) - 1
        loss_mask[row, start:end] = 1
        engine_lp[row, start:end] = torch.tensor(r.logprobs)
        if old_logprobs is not None:
            old_lp[row, start:end] = old_logprobs[i]
        if per_token:
            adv[row, start:end] = advantages[i]
    return MicroBatch(input_ids.to(device), attention.to(device), loss_mask.to(device), old_lp.to(device),
                      adv.to(device), engine_lp.to(device))


def token_budget_split(lengths: dict[int, int], budget: int, min_count: int = 1) -> list[list[int]]:
    """Rollout index -> sequence length, split into micro-batches of at most `budget` padded tokens (rows x
    longest row, what a forward pass allocates; a longer sequence goes alone), longest first so that rows of
    a micro-batch have similar lengths; then the largest are halved until there are `min_count` (ranks must
    run as many forward passes; halving only lowers a micro-batch's tokens). Ties keep index order."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    micro: list[list[int]] = []
    for i in order:
        if micro and (len(micro[-1]) + 1) * lengths[micro[-1][0]] <= budget:
            micro[-1].append(i)
        else:
            micro.append([i])
    while len(micro) < min(min_count, len(order)):
        largest = max((m for m in micro if len(m) > 1), key=lambda m: len(m) * lengths[m[0]])
        at = micro.index(largest)
        micro[at:at + 1] = [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return micro
