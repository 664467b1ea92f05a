"""Rollout engines: sample G completions per prompt and report the log-prob of every sampled token.

The log-probs are those of softmax(logits / temperature), the same quantity the trainer computes in its
forward pass (`lens.loss.token_logprobs_and_entropy`), so the PPO ratio starts at 1 on-policy. With
top_p < 1 the sampler draws from the truncated distribution but the reported log-prob is still that of
the tempered full distribution, as in verl; keep top_p = 1 (the paper's setting) for exact ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Rollout:
    prompt_index: int                  # index into the prompt list given to `generate`
    prompt_ids: list[int]
    completion_ids: list[int]          # up to and including the first EOS
    text: str                          # decoded completion, special tokens removed
    logprobs: list[float]              # one per completion token, under the rollout policy
    truncated: bool                    # no EOS within max_new_tokens

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / max(len(self.logprobs), 1)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    greedy: bool = False
    seed: int | None = None


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped: prompt 0's n samples first (greedy: one per prompt)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""

    def close(self) -> None: ...


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if not ids:
        raise ValueError("the model/tokenizer define no EOS token: completions could never end")
    return ids


def cut_at_eos(ids: list[int], logprobs: list[float], eos_ids: set[int]) -> tuple[list[int], list[float], bool]:
    """Keep tokens up to and including the first EOS; truncated when there is none."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: i + 1], logprobs[: i + 1], False
    return ids, logprobs, True


class SampledTokenLogprobs(LogitsProcessor):
    """Collects log softmax(logits / temperature) of each sampled token while `generate` runs.

    transformers calls its logits processors before the sampling warpers (temperature, top-p), so the
    scores seen here are the model's, and the token sampled from them shows up as the last column of
    `input_ids` at the next call. Only one step's distribution (batch x vocab) is held at a time;
    `output_logits=True` would keep every step's (batch x new tokens x vocab: with a 150k vocabulary,
    256 sequences of 1024 tokens would hold ~150 GB in fp32).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None   # [B, V] the step whose token is not yet known
        self.collected: list[torch.Tensor] = []    # one [B] tensor per sampled token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.collected.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """[B, new tokens] log-probs, given generate's output sequences (whose last token is still pending)."""
        if self.pending is not None:
            self.collected.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
            self.pending = None
        if not self.collected:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self.collected, dim=1).cpu()


class HFEngine:
    """transformers `generate`, sharing the trainer's model object (no weight copy, so sync is free)."""

    def __init__(self, model, tokenizer, batch_size: int = 256, static_cache: bool = False,
                 synced_gpus: bool = False):
        self.model = model
        self.synced_gpus = synced_gpus
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.static_cache = static_cache
        self.eos_ids = eos_token_ids(model, tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig) -> list[Rollout]:
        model = self.model
        was_training = model.training
        model.eval()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # Batches hold whole groups so each prompt is encoded once and expanded n times by generate.
        prompts_per_batch = max(1, self.batch_size // n)
        out: list[Rollout] = []
        try:
            for start in range(0, len(prompts), prompts_per_batch):
                chunk = prompts[start:start + prompts_per_batch]
                out.extend(self._generate_chunk(chunk, start, n, sampling))
        finally:
            model.train(was_training)
        return out

    def _generate_chunk(self, prompts: list[str], offset: int, n: int, sampling: SamplingConfig) -> list[Rollout]:
        tok = self.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        temperature = 1.0 if sampling.greedy else sampling.temperature
        recorder = SampledTokenLogprobs(temperature)
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if sampling.greedy else n,
            do_sample=not sampling.greedy,
            logits_processor=LogitsProcessorList([recorder]),
            return_dict_in_generate=True,
            use_cache=True,  # gradient checkpointing turns the config's cache off; generation needs it
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted(self.eos_ids),
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        if self.synced_gpus:  # sharded (FSDP) model: every rank runs every decode step, see Trainer
            kwargs["synced_gpus"] = True
        gen = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = gen.sequences[:, prompt_len:]
        logprobs = recorder.finish(gen.sequences)                                  # [B*n, T]
        assert logprobs.shape == new_tokens.shape, (logprobs.shape, new_tokens.shape)

        reps = 1 if sampling.greedy else n
        rollouts = []
        for row in range(new_tokens.shape[0]):
            p = row // reps
            prompt_ids = enc["input_ids"][p][enc["attention_mask"][p].bool()].tolist()
            ids, lps, truncated = cut_at_eos(new_tokens[row].tolist(), logprobs[row].tolist(), self.eos_ids)
            rollouts.append(Rollout(
                prompt_index=offset + p, prompt_ids=prompt_ids, completion_ids=ids,
                text=tok.decode(ids, skip_special_tokens=True), logprobs=lps, truncated=truncated))
        return rollouts


def make_engine(params, model, tokenizer, synced_gpus: bool = False) -> RolloutEngine:
    """The engine `rollout.engine` names, sampling from `model` (`synced_gpus`: the model is FSDP-sharded,
    HF engine only: `lens.train.check_fsdp_support` refuses the others under FSDP)."""
    if params.rollout.engine == "hf":
        return HFEngine(model, tokenizer, batch_size=params.rollout.batch_size,
                        static_cache=params.rollout.static_cache, synced_gpus=synced_gpus)
    if params.rollout.engine == "vllm":
        from lens.rollout_vllm import VLLMEngine  # optional dependency: imported only when asked for

        return VLLMEngine.from_params(params, model, tokenizer)
    raise ValueError(f"rollout.engine: unknown engine {params.rollout.engine!r}")
