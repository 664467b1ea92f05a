"""The train or eval problems a profile selects: its registered source, then the seeded size caps."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from lens.data.problems import LoadReport, Problem
from lens.data.prompt_budget import drop_long_prompts
from lens.data.registry import SourcePart, get_source

if TYPE_CHECKING:
    from lens.data.gold_check import GoldCheck
    from lens.params import Params

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")


def _seeded_subset(problems: list[Problem], n: int, seed: str) -> set[str]:
    """Ids of the first `n` problems after a seeded shuffle: a deterministic, unbiased sample."""
    ids = [p.id for p in problems]
    random.Random(seed).shuffle(ids)
    return set(ids[:n])


def _cap(parts: list[SourcePart], n: int, seed: str) -> list[SourcePart]:
    """Keep `n` problems over all parts together, charging each part's report for what it lost as "capped"."""
    keep = _seeded_subset([p for problems, _ in parts for p in problems], n, seed)
    capped = []
    for problems, report in parts:
        kept = [p for p in problems if p.id in keep]
        report.drop("capped", len(problems) - len(kept))
        capped.append(SourcePart(kept, report))
    return capped


def _cap_per_level(problems: list[Problem], report: LoadReport, n: int, seed: str) -> list[Problem]:
    keep: set[str] = set()
    for level in sorted({p.level for p in problems}):
        keep |= _seeded_subset([p for p in problems if p.level == level], n, f"{seed}|L{level}")
    kept = [p for p in problems if p.id in keep]
    report.drop("capped", len(problems) - len(kept))
    return kept


def load_problems_for(
    params: Params, split: str, source: str | None = None, gold_check: GoldCheck | None = None,
) -> tuple[list[Problem], list[LoadReport]]:
    """The train or eval problems that `params` selects, with one report per dataset read.

    data.train_source / data.eval_source name a registered source (lens.data.registry); `source` names
    another (an eval.extra_sets entry), selected by the same rules. Problems whose
    prompt exceeds data.max_prompt_tokens go first (lens.data.prompt_budget), then, given a `gold_check`
    (prepare's, lens.data.gold_check), those whose gold answer the verifier cannot parse. Eval then keeps
    at most max_eval_problems_per_level per dataset and level, train at most max_train_problems over all
    datasets; both choose by a shuffle seeded with run.seed and keep the original order.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = params.data
    source = source or (data.train_source if split == "train" else data.eval_source)
    parts = get_source(source)(params, split)
    parts = drop_long_prompts(parts, params)
    if gold_check is not None:
        parts = gold_check.drop_unparseable(parts)

    seed = f"{params.run.seed}|{split}"
    if split == "eval" and data.max_eval_problems_per_level is not None:
        parts = [SourcePart(_cap_per_level(problems, report, data.max_eval_problems_per_level, seed), report)
                 for problems, report in parts]
    if split == "train" and data.max_train_problems is not None:
        parts = _cap(parts, data.max_train_problems, seed)
    for _, report in parts:
        log.info("%s", report.summary())
    return [p for problems, _ in parts for p in problems], [report for _, report in parts]
