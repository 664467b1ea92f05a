"""Advantage estimators, by name: a registry every list of algorithms derives from.

An estimator maps a step's verifier rewards `correct` [num_groups, G] and the rollout policy's mean
token log-probs `mean_logprob` [num_groups, G] (plus its own typed params section, `train.<section>`,
and the shared `train.adv_eps`) to advantages [num_groups, G], broadcast to every token by the loss.
Every module of this package registers its estimators on import; `names()` imports them all. To add
one: a module here with a `@register(...)` function, its params section in lens/params.py, its tests.
An estimator whose advantages differ per token (LENS with `train.lens.penalty=token`) also registers a
`@register_token_advantages(name)` hook, which the trainer asks first with every token's pi_old.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, Any, float], torch.Tensor]
# (correct [P, G], pi_old per completion token of each of the P * G rollouts, section or None, eps) ->
# one advantage tensor per rollout (same lengths), or None: these settings want per-sequence advantages.
TokenAdvantageFn = Callable[[torch.Tensor, Sequence[Any], Any, float], list[torch.Tensor] | None]


@dataclass(frozen=True)
class Estimator:
    name: str
    advantages: AdvantageFn            # (correct, mean_logprob, section or None, eps) -> advantages
    section: str | None                # its params section, train.<section> (None: it has no params)
    summary: str                       # one line for `lens params --explain` and the README


_REGISTRY: dict[str, Estimator] = {}
_TOKEN_HOOKS: dict[str, TokenAdvantageFn] = {}
_discovered = False


def register(name: str, *, section: str | None = None, summary: str = "") -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register `fn(correct, mean_logprob, section, eps)` as the estimator `name`."""
    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in _REGISTRY and _REGISTRY[name].advantages is not fn:
            raise ValueError(f"estimator {name!r} is already registered")
        _REGISTRY[name] = Estimator(name, fn, section, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return add


def register_token_advantages(name: str) -> Callable[[TokenAdvantageFn], TokenAdvantageFn]:
    """Decorator: `fn(correct, per_rollout_logprobs, section, eps)` gives the estimator `name` per-token
    advantages when it returns tensors (None: `compute_advantages` as usual)."""
    def add(fn: TokenAdvantageFn) -> TokenAdvantageFn:
        if _TOKEN_HOOKS.get(name, fn) is not fn:
            raise ValueError(f"estimator {name!r} already has a per-token hook")
        _TOKEN_HOOKS[name] = fn
        return fn
    return add


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    _TOKEN_HOOKS.pop(name, None)


def _discover() -> None:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


def names() -> tuple[str, ...]:
    _discover()
    return tuple(_REGISTRY)


def get(name: str) -> Estimator:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"train.algo: unknown estimator {name!r} (registered: {', '.join(_REGISTRY)})") from None


def compute_advantages(train_params, correct: torch.Tensor, mean_logprob: torch.Tensor) -> torch.Tensor:
    """The advantages of the estimator `train_params.algo` names, with its params section."""
    est = get(train_params.algo)
    section = getattr(train_params, est.section) if est.section else None
    return est.advantages(correct, mean_logprob, section, train_params.adv_eps)


def compute_token_advantages(train_params, correct: torch.Tensor,
                             per_rollout_logprobs: Sequence[Any]) -> list[torch.Tensor] | None:
    """Per-token advantages of `train_params.algo`, one tensor per rollout (rollouts grouped as `correct`
    [P, G], row-major; `per_rollout_logprobs[k]`: rollout k's pi_old per completion token), or None when
    the estimator, with these params, gives one advantage per sequence (then `compute_advantages`)."""
    est = get(train_params.algo)
    hook = _TOKEN_HOOKS.get(est.name)
    if hook is None:
        return None
    section = getattr(train_params, est.section) if est.section else None
    return hook(correct, per_rollout_logprobs, section, train_params.adv_eps)
