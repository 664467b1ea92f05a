"""The rollout interface: what an engine returns (`Rollout`), how it samples (`SamplingConfig`), and the
registry that maps `rollout.engine` names to engine factories.

Light on purpose: `lens.params` validates `rollout.engine` against `engine_names()`, so this module imports
neither torch nor transformers, and factories are "module:attribute" strings resolved only when built.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class Rollout:
    prompt_index: int                  # index into the prompt list given to `generate`
    prompt_ids: list[int]
    completion_ids: list[int]          # up to and including the first EOS
    text: str                          # decoded completion, special tokens removed
    logprobs: list[float]              # one per completion token: log softmax(logits / temperature)
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
    """Reports the log-prob of every sampled token under softmax(logits / temperature), the quantity the
    trainer computes in its forward pass (`lens.loss.token_logprobs_and_entropy`), so the PPO ratio
    starts at 1 on-policy."""

    def generate(self, prompts: list[str], n: int, sampling: SamplingConfig,
                 on_groups: Callable[[list[Rollout]], None] | None = None) -> list[Rollout]:
        """len(prompts) * n rollouts, grouped: prompt 0's n samples first (greedy: one per prompt).

        Optional (see `streams`): `on_groups` is called, as generation goes, with each batch of finished
        groups (all samples of a prompt; batches in any prompt order), the same objects as returned, so the
        caller can verify them while the rest is generated (lens.scoring)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""

    def close(self) -> None: ...


def streams(engine) -> bool:
    """Whether `engine.generate` takes `on_groups` (engines registered before it existed do not)."""
    import inspect

    return "on_groups" in inspect.signature(engine.generate).parameters


def end_of_turn_ids(tokenizer) -> set[int]:
    """The token the tokenizer's chat template closes a turn with (ChatML `<|im_end|>`, Llama 3 `<|eot_id|>`),
    found as the special token that follows an assistant message; empty without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    from jinja2 import TemplateError

    marker = "LENS-END-OF-TURN-PROBE"
    turns = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except TemplateError:  # a template that refuses this conversation: no end-of-turn to learn from it
        return set()
    after = tokenizer.encode(text.partition(marker)[2], add_special_tokens=False)[:1]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return {after[0]} if after and after[0] in special else set()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Where a completion ends: the EOS ids of the model's generation config and the tokenizer, plus the chat
    template's end-of-turn token (a base model such as Qwen2.5 ends a ChatML turn with `<|im_end|>` but
    lists only `<|endoftext|>` as EOS; text after an end-of-turn is a new turn, whatever the prompt)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if not ids:
        raise ValueError("the model/tokenizer define no EOS token: completions could never end")
    return ids | end_of_turn_ids(tokenizer)


def cut_at_eos(ids: list[int], logprobs: list[float], eos_ids: set[int]) -> tuple[list[int], list[float], bool]:
    """Keep tokens up to and including the first EOS; truncated when there is none."""
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: i + 1], logprobs[: i + 1], False
    return ids, logprobs, True


# ---- registry -----------------------------------------------------------------------------------
# A factory is called as factory(params, model, tokenizer, synced_gpus=...) and returns a RolloutEngine;
# `synced_gpus`: the model is FSDP-sharded; the HF engine then runs every decode step on every rank (the
# vLLM engine ignores it: each rank's engine holds gathered weights and generates on its own).
EngineFactory = Callable[..., RolloutEngine]

_ENGINES: dict[str, str | EngineFactory] = {
    "hf": "lens.rollout.hf:HFEngine.from_params",
    "vllm": "lens.rollout.vllm:VLLMEngine.from_params",  # optional dependency: imported when built
}


def register_engine(name: str, factory: str | EngineFactory) -> None:
    """Make `rollout.engine=<name>` build engines with `factory`: a callable, or a "module:attribute"
    string imported only when such an engine is built. Replaces any engine of that name."""
    _ENGINES[name] = factory


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def make_engine(params, model, tokenizer, synced_gpus: bool = False) -> RolloutEngine:
    """The engine `rollout.engine` names, sampling from `model`."""
    name = params.rollout.engine
    if name not in _ENGINES:
        raise ValueError(f"rollout.engine: unknown engine {name!r}; registered engines: {', '.join(_ENGINES)}")
    factory = _ENGINES[name]
    if isinstance(factory, str):
        factory = pkgutil.resolve_name(factory)
    return factory(params, model, tokenizer, synced_gpus=synced_gpus)
