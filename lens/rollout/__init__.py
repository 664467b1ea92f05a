"""Rollout engines: sample G completions per prompt and report the log-prob of every sampled token.

The interface and the engine registry live in `base`; `hf` holds the transformers engine (imported on
first use of `HFEngine`) and `vllm` the vLLM one (imported only by `rollout.engine=vllm` or explicitly).
"""

from __future__ import annotations

import importlib

from lens.rollout.base import (EngineFactory, Rollout, RolloutEngine, SamplingConfig, cut_at_eos, engine_names,
                               eos_token_ids, make_engine, register_engine, streams)

__all__ = ["EngineFactory", "HFEngine", "Rollout", "RolloutEngine", "SamplingConfig", "cut_at_eos", "engine_names",
           "eos_token_ids", "make_engine", "register_engine", "streams"]


def __getattr__(name: str):
    # Lazy, so that `lens.params` (which imports `base`, hence this package) does not pull in transformers.
    if name == "HFEngine":
        return importlib.import_module("lens.rollout.hf").HFEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
