"""The transformers rollout engine: `model.generate` on the trainer's own model object.

With top_p < 1 the sampler draws from the truncated distribution but the reported log-prob is still that
of the tempered full distribution, as in verl; keep top_p = 1 (the paper's setting) for exact ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lens.rollout.base import Rollout, SamplingConfig, cut_at_eos, eos_token_ids


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
                 synced_gpus: bool = False, compute_dtype: str = "float32"):
        self.model = model
        self.compute_dtype = getattr(torch, compute_dtype)
        self.synced_gpus = synced_gpus
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.static_cache = static_cache
        self.eos_ids = eos_token_ids(model, tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_params(cls, params, model, tokenizer, synced_gpus: bool = False) -> HFEngine:
        """`synced_gpus`: the model is FSDP-sharded, so every rank runs every decode step (see Trainer)."""
        return cls(model, tokenizer, batch_size=params.rollout.batch_size, static_cache=params.rollout.static_cache,
                   synced_gpus=synced_gpus, compute_dtype=params.model.compute_dtype)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig,
                 on_groups: Callable[[list[Rollout]], None] | None = None) -> list[Rollout]:
        model = self.model
        was_training = model.training
        model.eval()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # Batches hold whole groups so each prompt is encoded once and expanded n times by generate.
        prompts_per_batch = max(1, self.batch_size // n)
        out: list[Rollout] = []
        device_type = next(model.parameters()).device.type
        autocast = torch.autocast(device_type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        try:
            with autocast:  # model.compute_dtype: the engine samples at the precision the trainer computes in
                for start in range(0, len(prompts), prompts_per_batch):
                    chunk = prompts[start:start + prompts_per_batch]
                    done = self._generate_chunk(chunk, start, n, sampling)
                    out.extend(done)
                    if on_groups is not None:  # verified while the next chunk generates (lens.scoring)
                        on_groups(done)
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
