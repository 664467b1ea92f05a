"""The prompt budget, data.max_prompt_tokens: `prepare` drops the problems whose prompt is longer.

A prompt is measured as training renders it (model.prompt), in tokens of the profile's tokenizer, loaded
without its model (fetched like the datasets when not cached, so a fresh machine measures as a warm one).
When it cannot be loaded (offline and not in the cache, or the smollm2 model not converted yet) the user
message's length is estimated as characters/4, about what a BPE tokenizer makes of English and LaTeX; the
rule recorded in report.json says which measure decided.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens.data.problems import Problem, render_prompt, user_message
from lens.data.registry import SourcePart

if TYPE_CHECKING:
    from lens.params import Params

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4


def _tokenizer_dir(params: Params) -> str | None:
    """Where the profile's tokenizer is, without building or converting anything; None if not there yet."""
    model = params.model
    if model.source == "hub":
        local = params.resolve_path(model.name_or_path)
        return str(local) if local.exists() else model.name_or_path
    if model.source == "smollm2":
        from lens import smollm2

        base = Path(str(params.resolve_path(model.cache_dir))).expanduser() if model.cache_dir \
            else smollm2.default_cache_dir()
        converted = base / smollm2.MODEL_DIR_NAME
        return str(converted) if (converted / smollm2.MANIFEST).exists() else None
    return None


def profile_tokenizer(params: Params, local_only: bool = False) -> Any | None:
    """The tokenizer of the profile's starting policy (no model loaded), or None when it is unavailable.

    `local_only`: never reach the network (files already on disk or in the hub cache only). The tiny
    profile's character tokenizer is built in code: it is the one the warm start saves.
    """
    if params.model.source == "warm_start":
        from lens.tiny_model import build_char_tokenizer

        return build_char_tokenizer()
    path = _tokenizer_dir(params)
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=local_only,
                                             trust_remote_code=params.model.trust_remote_code)
    except (OSError, ValueError) as exc:  # not cached offline, no such repo or directory
        log.info("tokenizer of %s not available (%s: %s)", path, type(exc).__name__, exc)
        return None


def prompt_measure(params: Params) -> tuple[Callable[[list[Problem]], list[int]], str]:
    """(lengths of the problems' prompts, a description of the unit) for the profile."""
    prompt = params.model.prompt
    tokenizer = profile_tokenizer(params)
    if tokenizer is not None:
        def tokens(problems: list[Problem]) -> list[int]:
            texts = [render_prompt(p, tokenizer, prompt) for p in problems]
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

        name = getattr(tokenizer, "name_or_path", "") or params.model.source
        return tokens, f"tokens of the {name} tokenizer, {prompt.template} template"

    def estimate(problems: list[Problem]) -> list[int]:
        return [-(-len(user_message(p, prompt.instruction)) // CHARS_PER_TOKEN) for p in problems]

    return estimate, f"characters/{CHARS_PER_TOKEN} of the user message (the model's tokenizer was not available)"


def drop_long_prompts(parts: list[SourcePart], params: Params) -> list[SourcePart]:
    """Each part without the problems whose prompt exceeds data.max_prompt_tokens, counted as prompt_too_long."""
    budget = params.data.max_prompt_tokens
    if budget is None:
        return parts
    measure, unit = prompt_measure(params)
    rule = f"prompt longer than {budget} {unit}"
    log.info("prompt budget: %s", rule)
    kept_parts = []
    for problems, report in parts:
        kept = [p for p, n in zip(problems, measure(problems)) if n <= budget]
        report.drop("prompt_too_long", len(problems) - len(kept), rule)
        kept_parts.append(SourcePart(kept, report))
    return kept_parts
