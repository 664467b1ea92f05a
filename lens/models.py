"""Loading the policy (and tokenizer) that a profile names, safely: safetensors only, no remote code."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def policy_source(params) -> str:
    """Directory or hub id of the starting policy for `params.model.source`."""
    source = params.model.source
    if source == "warm_start":
        path = params.warm_start_dir / "model"
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no warm-started model at {path}: run `lens warm-start --profile {params.profile}` first")
        return str(path)
    if source == "hub":
        if not params.model.name_or_path:
            raise ValueError("model.name_or_path: required when model.source is 'hub'")
        local = params.resolve_path(params.model.name_or_path)
        return str(local) if local.exists() else params.model.name_or_path
    if source == "smollm2":
        from lens.smollm2 import ensure_smollm2  # optional extra: imported only for this profile

        cache = params.model.cache_dir
        return str(ensure_smollm2(str(params.resolve_path(cache)) if cache else None))
    raise ValueError(f"model.source: unknown source {source!r}")


def load_model(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(params, path: str | Path | None = None):
    """(model, tokenizer) from `path` or the profile's starting policy."""
    path = path or policy_source(params)
    model = load_model(path, params.model.dtype, params.model.trust_remote_code)
    tokenizer = load_tokenizer(path, params.model.trust_remote_code)
    if params.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer
