"""MATH, GSM8K, DAPO-Math-17k, AIME and AMC from a local .jsonl/.parquet file or a hub id, normalised to
`Problem`.

Loaders never drop a row silently: each unusable row (no level, no answer, no problem text, a duplicate
id, unparsable JSON) is counted by reason in a `LoadReport` and logged as a warning, because real MATH
dumps do contain such rows ("Level ?", solutions without `\\boxed{}`), and a quietly shrinking dataset
skews per-level results. Rows removed on purpose (the `levels` filter, a contest's other years) are
counted under their own reason.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lens.data.boxed import last_boxed
from lens.data.problems import UNRATED_LEVEL, LoadReport, Problem

log = logging.getLogger(__name__)

HENDRYCKS_MATH = "EleutherAI/hendrycks_math"
# DAPO-Math-17k wraps each problem in this instruction (an `Answer:` line, not a box); we keep the problem.
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
# The hub publishes this dataset as one config per subject; the order fixes the concatenation order.
HENDRYCKS_CONFIGS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                     "number_theory", "prealgebra", "precalculus")
GSM8K_HUB_CONFIG = "main"
# AIME 2024 (HuggingFaceH4/aime_2024) and AMC (AI-MO/aimo-validation-amc) publish their rows as split "train".
COMPETITION_HUB_SPLIT = "train"
LOCAL_SUFFIXES = (".jsonl", ".parquet")
# Reasons a converter gives for rows left out on purpose: counted in the report like defects, not warned about.
SELECTIONS = frozenset({"other_year"})


# A problem this long is not a math problem but a broken row (a 5 MB "problem" made training allocate
# gigabytes): dropped and counted as "oversized". MATH's longest problem is ~4k characters.
MAX_PROBLEM_CHARS = 20_000


class _BadLine:
    """A line of a .jsonl file that is not a JSON object, with why and where (1-based line number)."""

    def __init__(self, reason: str, line: int) -> None:
        self.reason, self.line = reason, line


class _Skip(Exception):
    """Raised by a row converter: the row is unusable for the reason given."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- reading rows -----------------------------------------------------------------------------

def is_local(source: str) -> bool:
    """An existing file, or a name with a local file suffix, is local.

    Anything else (a hub id, a local dataset folder) goes to `datasets`.
    """
    return Path(source).is_file() or source.endswith(LOCAL_SUFFIXES)


def _read_local(path: Path) -> list[dict[str, Any] | _BadLine]:
    """Rows of a .jsonl or .parquet file; a .jsonl line that is not valid UTF-8 or not a JSON object is a
    _BadLine (counted by the caller, with its line number). An empty file is an error naming it."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = [_parse_json_line(raw, number) for number, raw in enumerate(path.read_bytes().splitlines(), start=1)
                if raw.strip()]
    else:
        raise ValueError(f"unsupported data file {path}: expected one of {LOCAL_SUFFIXES}")
    if not rows:
        raise ValueError(f"data file {path} is empty: no rows")
    return rows


def _parse_json_line(raw: bytes, number: int) -> dict[str, Any] | _BadLine:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _BadLine("not_utf8", number)
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the interpreter's stack
        return _BadLine("bad_json", number)
    if not isinstance(row, dict):
        return _BadLine("bad_json", number)
    if "\\ud" in line.lower():  # JSON can escape a lone surrogate: not text, and not writable as UTF-8
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return _BadLine("not_utf8", number)
    return row


def _read_hub(source: str, split: str, configs: Sequence[str | None]) -> list[dict[str, Any] | None]:
    """Rows of a hub dataset split, concatenated over `configs` (imported lazily: `datasets` is slow to import)."""
    import datasets

    rows: list[dict[str, Any] | None] = []
    for config in configs:
        rows.extend(datasets.load_dataset(source, config, split=split))
    return rows


def _read_rows(source: str, split: str, hub_configs: Sequence[str | None]) -> list[dict[str, Any] | None]:
    return _read_local(Path(source)) if is_local(source) else _read_hub(source, split, hub_configs)


def _id_prefix(source: str, split: str) -> str:
    """Prefix of index-based ids for rows without `unique_id`: the file stem, or the hub name and split."""
    return Path(source).stem if is_local(source) else f"{source.rsplit('/', 1)[-1]}-{split}"


# ---- normalising rows -------------------------------------------------------------------------

def parse_level(value: Any) -> int | None:
    """1..5 from an int (MATH-500) or "Level N" (hendrycks_math); None for "Level ?", missing or out of range."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", value)
        value = int(match.group(1)) if match else None
    return value if isinstance(value, int) and 1 <= value <= 5 else None


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    return str(value).strip() if value is not None and not isinstance(value, bool) else ""


def _math_problem(row: Mapping[str, Any], fallback_id: str) -> Problem:
    """One MATH row of either public schema; the `answer` column wins over the solution's last box."""
    problem = _text(row, "problem")
    if not problem:
        raise _Skip("missing_problem")
    level = parse_level(row.get("level"))
    if level is None:
        raise _Skip("bad_level")
    answer = _text(row, "answer") or last_boxed(_text(row, "solution")) or ""
    if not answer:
        raise _Skip("no_answer")
    subject = _text(row, "subject") or _text(row, "type") or "unknown"
    return Problem(_text(row, "unique_id") or fallback_id, problem, answer, level, subject)


def gsm8k_final_answer(answer: str) -> str | None:
    """Text after the last `####` (commas removed), or the whole field when it is a bare value."""
    final = answer.rsplit("####", 1)[-1] if "####" in answer else answer
    final = final.strip().replace(",", "")
    return final if final and not re.search(r"\s", final) else None


def _gsm8k_problem(row: Mapping[str, Any], fallback_id: str) -> Problem:
    question = _text(row, "question")
    if not question:
        raise _Skip("missing_problem")
    answer = gsm8k_final_answer(_text(row, "answer"))
    if answer is None:
        raise _Skip("no_answer")
    return Problem(fallback_id, question, answer, 1, "gsm8k")


def normalized_text(text: str) -> str:
    """The key two problems are duplicates on: NFKC, case-folded, without whitespace and `$` delimiters."""
    return re.sub(r"[\s$]+", "", unicodedata.normalize("NFKC", text)).casefold()


def drop_duplicates_of(problems: list[Problem], report: LoadReport, others: Iterable[Problem], reason: str,
                       rule: str) -> list[Problem]:
    """Drop the problems whose normalised text is one of `others`' (e.g. the eval set's), counted as `reason`."""
    taken = {normalized_text(p.problem) for p in others}
    kept = [p for p in problems if normalized_text(p.problem) not in taken]
    report.drop(reason, len(problems) - len(kept), rule)
    return kept


def _dapo_problem_text(prompt: Any) -> str:
    """The problem inside DAPO's chat-list prompt: the user turn without DAPO's own instruction around it."""
    turns = prompt if isinstance(prompt, list) else []
    content = next((t.get("content") for t in turns if isinstance(t, Mapping) and t.get("role") == "user"), None)
    text = str(content or "").strip()
    return text.removeprefix(DAPO_PREFIX.strip()).removesuffix(DAPO_SUFFIX.strip()).strip()


def _dapo_converter() -> Callable[[Mapping[str, Any], str], Problem]:
    """A DAPO row converter that also skips repeats of a problem already seen (the hub file holds each
    problem many times over: 1.79M rows for ~17k problems)."""
    seen: set[str] = set()

    def convert(row: Mapping[str, Any], fallback_id: str) -> Problem:
        problem = _dapo_problem_text(row.get("prompt"))
        if not problem:
            raise _Skip("missing_problem")
        reward_model = row.get("reward_model")
        answer = _text(reward_model, "ground_truth") if isinstance(reward_model, Mapping) else ""
        if not answer:
            raise _Skip("no_answer")
        key = normalized_text(problem)
        if key in seen:
            raise _Skip("duplicate_problem")
        seen.add(key)
        extra = row.get("extra_info")
        index = _text(extra, "index") if isinstance(extra, Mapping) else ""
        return Problem(f"dapo-{index}" if index else fallback_id, problem, answer, UNRATED_LEVEL, "dapo")

    return convert


def integer_answer(value: Any) -> str:
    """A competition answer as text: integral numbers without a fraction or leading zeros (AMC's float 142.0
    and "142.0" -> "142", AIME's "033" -> "33"); anything else as written ("" when missing)."""
    if value is None or isinstance(value, bool) or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    match = re.fullmatch(r"([+-]?)0*(\d+)(?:\.0*)?", text)
    return f"{match.group(1).replace('+', '')}{match.group(2)}" if match else text


def _row_year(row: Mapping[str, Any]) -> int | None:
    """The contest year of a row: its `year` column, else the year in its AoPS url (2023_AMC_12A_Problems/...)."""
    year = _text(row, "year")
    if year.isdigit():
        return int(year)
    match = re.search(r"(?<!\d)((?:19|20)\d{2})_", _text(row, "url"))
    return int(match.group(1)) if match else None


def _competition_converter(name: str, year: int) -> Callable[[Mapping[str, Any], str], Problem]:
    """A row of AIME/AMC's schema (id, problem or question, answer[, solution, url, year]) as a Problem of
    level UNRATED_LEVEL (the contests have no MATH-style difficulty rating) and subject `name`; rows of
    another year are skipped as other_year (rows without a year are kept)."""
    def convert(row: Mapping[str, Any], fallback_id: str) -> Problem:
        if _row_year(row) not in (None, year):
            raise _Skip("other_year")
        problem = _text(row, "problem") or _text(row, "question")
        if not problem:
            raise _Skip("missing_problem")
        answer = integer_answer(row.get("answer")) or (last_boxed(_text(row, "solution")) or "")
        if not answer:
            raise _Skip("no_answer")
        row_id = _text(row, "id")
        return Problem(f"{name}-{row_id}" if row_id else fallback_id, problem, answer, UNRATED_LEVEL, name)

    return convert


def _collect(
    rows: Sequence[dict[str, Any] | None],
    source: str,
    id_prefix: str,
    convert: Callable[[Mapping[str, Any], str], Problem],
    levels: Iterable[int] | None,
) -> tuple[list[Problem], LoadReport]:
    """Convert rows, count every dropped row by reason, warn about defects, then apply the level filter."""
    problems: list[Problem] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    examples: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        where = f"line {row.line}" if isinstance(row, _BadLine) else f"row {index + 1}"
        try:
            if row is None or isinstance(row, _BadLine):
                raise _Skip(row.reason if row is not None else "bad_json")
            problem = convert(row, f"{id_prefix}-{index:06d}")
            if problem.id in seen:
                raise _Skip("duplicate_id")
            if len(problem.problem) + len(problem.answer) > MAX_PROBLEM_CHARS:
                raise _Skip("oversized")
        except _Skip as skip:
            dropped[skip.reason] += 1
            examples[skip.reason].append(where)
            continue
        seen.add(problem.id)
        problems.append(problem)
    for reason, count in sorted(dropped.items()):
        if reason in SELECTIONS:
            continue
        log.warning("%s: dropped %d row(s): %s (e.g. %s)", source, count, reason, ", ".join(examples[reason][:5]))
    report = LoadReport(source, len(rows), len(problems), dict(dropped))
    return filter_levels(problems, report, levels), report


def filter_levels(problems: list[Problem], report: LoadReport, levels: Iterable[int] | None) -> list[Problem]:
    """Keep `levels` (None: all); the rest are counted as "level_filtered", a selection rather than a defect."""
    if levels is None:
        return problems
    wanted = set(levels)
    kept = [p for p in problems if p.level in wanted]
    report.drop("level_filtered", len(problems) - len(kept))
    return kept


def load_math(
    source: str, split: str = "train", levels: Iterable[int] | None = None,
) -> tuple[list[Problem], LoadReport]:
    """MATH from a local .jsonl/.parquet or a hub id (hendrycks_math: every subject config, concatenated)."""
    configs: tuple[str | None, ...] = HENDRYCKS_CONFIGS if source == HENDRYCKS_MATH else (None,)
    rows = _read_rows(source, split, configs)
    return _collect(rows, source, _id_prefix(source, split), _math_problem, levels)


def load_gsm8k(
    source: str, split: str = "train", levels: Iterable[int] | None = None,
) -> tuple[list[Problem], LoadReport]:
    """GSM8K from a local .jsonl/.parquet or a hub id (config "main"); every problem is level 1, subject "gsm8k"."""
    rows = _read_rows(source, split, (GSM8K_HUB_CONFIG,))
    return _collect(rows, source, f"gsm8k-{_id_prefix(source, split)}", _gsm8k_problem, levels)


def load_dapo(source: str, split: str = "train") -> tuple[list[Problem], LoadReport]:
    """DAPO-Math-17k (verl schema: `prompt` a chat list, `reward_model.ground_truth` the answer) from a local
    .jsonl/.parquet or a hub id; repeated problems (same normalised text) are dropped as duplicate_problem.

    Its problems have no difficulty rating: level UNRATED_LEVEL (0), subject "dapo".
    """
    if is_local(source):
        rows: Sequence[dict[str, Any] | None] = _read_local(Path(source))
    else:
        import datasets

        rows = datasets.load_dataset(source, split=split)  # iterated lazily: the file has 1.79M rows
    problems, report = _collect(rows, source, f"dapo-{_id_prefix(source, split)}", _dapo_converter(), None)
    report.rules["duplicate_problem"] = "the normalised text (lens.data.loaders.normalized_text) of an earlier row"
    return problems, report


def load_competition(
    source: str, name: str, year: int, split: str = COMPETITION_HUB_SPLIT,
) -> tuple[list[Problem], LoadReport]:
    """A contest's problems of `year` (e.g. "aime2024", 2024) from a local .jsonl/.parquet or a hub id.

    Ids are `<name>-<id column>` (`<name>-<file or hub name>-<row index>` without one), answers
    `integer_answer`s. Rows of another year (by `year`, else the url) are counted as other_year, a selection
    like level_filtered, so a multi-year file such as AI-MO/aimo-validation-amc (AMC 12 2022 and 2023)
    yields one year's contest.
    """
    rows = _read_rows(source, split, (None,))
    problems, report = _collect(rows, source, f"{name}-{_id_prefix(source, split)}",
                                _competition_converter(name, year), None)
    report.rules["other_year"] = f"the row's year column or AoPS url names a year other than {year}"
    return problems, report
