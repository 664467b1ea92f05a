"""The built-in data sources: synthetic, math, gsm8k, mixture (synthetic + GSM8K + MATH), dapo
(DAPO-Math-17k, train only), math_dapo (the paper's MATH train + DAPO-Math-17k; eval: MATH-500), and the
evaluation-only contests aime2024 and amc2023 (for data.eval_source or eval.extra_sets).

Datasets come from the data.*_path keys: a hub id (the defaults) or a local .jsonl/.parquet file.
A dataset that cannot be read fails naming the key to change, because offline (HF_HUB_OFFLINE=1) a hub id
works only when the dataset is already in the local cache, and a bare `datasets` error does not say so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from lens.data.loaders import (
    LOCAL_SUFFIXES,
    drop_duplicates_of,
    is_local,
    load_competition,
    load_dapo,
    load_gsm8k,
    load_math,
)
from lens.data.problems import LoadReport, Problem
from lens.data.registry import SourcePart, get_source, register_source
from lens.data.synthetic import synthetic_problems

if TYPE_CHECKING:
    from lens.params import Params

HUB_SPLIT = {"train": "train", "eval": "test"}  # hub datasets name the evaluation split "test"

DatasetLoader = Callable[[str, str, Iterable[int]], tuple[list[Problem], LoadReport]]


class DataUnavailableError(FileNotFoundError):
    """A data.*_path names a dataset that cannot be read; the message names the key and how to fix it."""


def _locate(params: Params, path: str) -> str:
    """Local paths resolve against the project root; a hub id with no such local file passes unchanged."""
    resolved = params.resolve_path(path)
    return os.path.normpath(resolved) if resolved.exists() or path.endswith(LOCAL_SUFFIXES) else path


def _unavailable(key: str, source: str, exc: Exception) -> DataUnavailableError:
    fix = (f"set {key}=<a local .jsonl or .parquet file> (a relative path is relative to the project root) "
           "or to a hub dataset id")
    if not is_local(source):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            fix += "; HF_HUB_OFFLINE is set, so a hub dataset must already be in the local cache"
    return DataUnavailableError(f"{key}: cannot load {source!r} ({type(exc).__name__}: {exc}); {fix}")


def _load(params: Params, key: str, load: Callable[..., tuple[list[Problem], LoadReport]], *args) -> SourcePart:
    """load(<data.key resolved>, *args), failing with the key's name when the dataset cannot be read."""
    source = _locate(params, getattr(params.data, key))
    try:
        return SourcePart(*load(source, *args))
    except (OSError, ValueError) as exc:  # missing file or hub dataset, offline, unsupported file type
        raise _unavailable(f"data.{key}", source, exc) from exc


def _dataset_part(params: Params, split: str, dataset: str, load: DatasetLoader) -> SourcePart:
    """`dataset` ("math", "gsm8k") of the split from data.<dataset>_<split>_path, filtered to data.levels."""
    return _load(params, f"{dataset}_{split}_path", load, HUB_SPLIT[split], params.data.levels)


def _dapo_part(params: Params, split: str) -> SourcePart:
    """DAPO-Math-17k without repeats and without the problems of the eval set (data.eval_source)."""
    if split != "train":
        raise ValueError("DAPO-Math-17k has only a train split: set data.eval_source to another source "
                         "(the paper evaluates on MATH-500: math)")
    problems, report = _load(params, "dapo_train_path", load_dapo, HUB_SPLIT[split])
    eval_source = params.data.eval_source
    eval_problems = [p for part in get_source(eval_source)(params, "eval") for p in part.problems]
    problems = drop_duplicates_of(problems, report, eval_problems, "duplicate_of_eval",
                                  f"the normalised text of a problem of data.eval_source={eval_source}")
    return SourcePart(problems, report)


def _synthetic_part(params: Params, split: str, levels: Iterable[int]) -> SourcePart:
    syn = params.data.synthetic
    levels = list(levels)
    problems = synthetic_problems(split, syn.train_per_level if split == "train" else syn.eval_per_level,
                                  syn.seed, levels)
    source = f"synthetic(split={split}, levels={levels}, seed={syn.seed})"
    return SourcePart(problems, LoadReport(source, len(problems), len(problems), {}))


@register_source("synthetic")
def synthetic_source(params: Params, split: str) -> list[SourcePart]:
    return [_synthetic_part(params, split, params.data.levels)]


@register_source("math")
def math_source(params: Params, split: str) -> list[SourcePart]:
    return [_dataset_part(params, split, "math", load_math)]


@register_source("gsm8k")
def gsm8k_source(params: Params, split: str) -> list[SourcePart]:
    return [_dataset_part(params, split, "gsm8k", load_gsm8k)]


@register_source("mixture")
def mixture_source(params: Params, split: str) -> list[SourcePart]:
    """Synthetic at data.mixture_synthetic_levels, then GSM8K and MATH at data.levels."""
    return [_synthetic_part(params, split, params.data.mixture_synthetic_levels),
            *gsm8k_source(params, split), *math_source(params, split)]


@register_source("dapo")
def dapo_source(params: Params, split: str) -> list[SourcePart]:
    return [_dapo_part(params, split)]


@register_source("math_dapo")
def math_dapo_source(params: Params, split: str) -> list[SourcePart]:
    """The paper's data: MATH train + DAPO-Math-17k (less the problems MATH train already has); eval: MATH."""
    math = math_source(params, split)
    if split != "train":
        return math
    dapo = _dapo_part(params, split)
    problems = drop_duplicates_of(dapo.problems, dapo.report, math[0].problems, "duplicate_of_math_train",
                                  "the normalised text of a problem of data.math_train_path")
    return [*math, SourcePart(problems, dapo.report)]


def _contest_part(params: Params, split: str, name: str, year: int) -> SourcePart:
    """The contest `name` of `year` from data.<name>_path; contests are evaluation sets only."""
    if split != "eval":
        raise ValueError(f"{name} is an evaluation set (no train split): set data.train_source to another "
                         f"source; name {name} in data.eval_source or eval.extra_sets")
    return _load(params, f"{name}_path", load_competition, name, year)


@register_source("aime2024")
def aime2024_source(params: Params, split: str) -> list[SourcePart]:
    """AIME 2024 I and II (HuggingFaceH4/aime_2024: 30 problems, integer answers 0-999)."""
    return [_contest_part(params, split, "aime2024", 2024)]


@register_source("amc2023")
def amc2023_source(params: Params, split: str) -> list[SourcePart]:
    """AMC 12 2023 (the 2023 rows of AI-MO/aimo-validation-amc, whose problems were rewritten to have an
    integer answer; its 2022 rows are counted as other_year)."""
    return [_contest_part(params, split, "amc2023", 2023)]
