"""Problems for training and evaluation: MATH, GSM8K, DAPO-Math-17k, AIME 2024, AMC 2023 and a synthetic
arithmetic curriculum.

problems: the `Problem` record, jsonl files, prompts. boxed: answer extraction. loaders: MATH/GSM8K/DAPO
and the AIME/AMC contests from local files or the hub. synthetic: the arithmetic curriculum. registry +
sources: the data sources that data.train_source / data.eval_source / eval.extra_sets name. prompt_budget:
data.max_prompt_tokens. assemble: `load_problems_for`, the per-profile selection.
"""

from lens.data.assemble import load_problems_for
from lens.data.boxed import last_boxed
from lens.data.loaders import (
    GSM8K_HUB_CONFIG,
    HENDRYCKS_CONFIGS,
    HENDRYCKS_MATH,
    LOCAL_SUFFIXES,
    drop_duplicates_of,
    filter_levels,
    gsm8k_final_answer,
    integer_answer,
    load_competition,
    load_dapo,
    load_gsm8k,
    load_math,
    normalized_text,
    parse_level,
)
from lens.data.problems import (
    INSTRUCTION,
    PLAIN_TEMPLATE,
    UNRATED_LEVEL,
    LoadReport,
    Problem,
    read_problems,
    render_prompt,
    user_message,
    write_problems,
)
from lens.data.prompt_budget import profile_tokenizer
from lens.data.registry import Loader, SourcePart, get_source, register_source, source_names
from lens.data.sources import DataUnavailableError
from lens.data.synthetic import (
    EVAL_SHARE_PERCENT,
    LEVEL_GENERATORS,
    SYNTHETIC_SPLITS,
    canonical_form,
    synthetic_problems,
    synthetic_split_of,
)

__all__ = [
    "EVAL_SHARE_PERCENT", "GSM8K_HUB_CONFIG", "HENDRYCKS_CONFIGS", "HENDRYCKS_MATH", "INSTRUCTION",
    "LEVEL_GENERATORS", "LOCAL_SUFFIXES", "PLAIN_TEMPLATE", "SYNTHETIC_SPLITS", "UNRATED_LEVEL",
    "DataUnavailableError", "LoadReport", "Loader", "Problem", "SourcePart", "canonical_form",
    "drop_duplicates_of", "filter_levels", "get_source", "gsm8k_final_answer", "integer_answer", "last_boxed",
    "load_competition", "load_dapo", "load_gsm8k", "load_math", "load_problems_for", "normalized_text",
    "parse_level", "profile_tokenizer", "read_problems", "register_source", "render_prompt", "source_names",
    "synthetic_problems", "synthetic_split_of", "user_message", "write_problems",
]
