"""Problems for training and evaluation: MATH, GSM8K and a synthetic arithmetic curriculum.

problems: the `Problem` record, jsonl files, prompts. boxed: answer extraction. loaders: MATH/GSM8K
from local files or the hub. synthetic: the arithmetic curriculum. registry + sources: the data sources
that data.train_source / data.eval_source name. assemble: `load_problems_for`, the per-profile selection.
"""

from lens.data.assemble import load_problems_for
from lens.data.boxed import last_boxed
from lens.data.loaders import (
    GSM8K_HUB_CONFIG,
    HENDRYCKS_CONFIGS,
    HENDRYCKS_MATH,
    LOCAL_SUFFIXES,
    filter_levels,
    gsm8k_final_answer,
    load_gsm8k,
    load_math,
    parse_level,
)
from lens.data.problems import (
    INSTRUCTION,
    PLAIN_TEMPLATE,
    LoadReport,
    Problem,
    read_problems,
    render_prompt,
    write_problems,
)
from lens.data.registry import Loader, SourcePart, get_source, register_source, source_names
from lens.data.sources import DataUnavailableError
from lens.data.synthetic import (
    EVAL_SHARE_PERCENT,
    LEVEL_GENERATORS,
    SYNTHETIC_SPLITS,
    synthetic_problems,
    synthetic_split_of,
)

__all__ = [
    "EVAL_SHARE_PERCENT", "GSM8K_HUB_CONFIG", "HENDRYCKS_CONFIGS", "HENDRYCKS_MATH", "INSTRUCTION",
    "LEVEL_GENERATORS", "LOCAL_SUFFIXES", "PLAIN_TEMPLATE", "SYNTHETIC_SPLITS", "DataUnavailableError",
    "LoadReport", "Loader", "Problem", "SourcePart", "filter_levels", "get_source", "gsm8k_final_answer",
    "last_boxed", "load_gsm8k", "load_math", "load_problems_for", "parse_level", "read_problems",
    "register_source", "render_prompt", "source_names", "synthetic_problems", "synthetic_split_of",
    "write_problems",
]
