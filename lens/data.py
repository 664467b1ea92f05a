"""Problems for training and evaluation: MATH, GSM8K and a synthetic arithmetic curriculum.

Every source is normalised to one `Problem` record. Loaders never drop a row silently: each
unusable row (no level, no answer, no problem text, a duplicate id, unparsable JSON) is counted by
reason in a `LoadReport` and logged as a warning, because real MATH dumps do contain such rows
("Level ?", solutions without `\\boxed{}`), and a quietly shrinking dataset skews per-level results.
Rows removed on purpose (the `levels` filter, size caps) are counted too, under their own reasons,
so they are never confused with malformed data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lens.params import Params

log = logging.getLogger(__name__)

PLAIN_TEMPLATE = "Q: {problem}\nA: "
INSTRUCTION = "Put your final answer within \\boxed{}."

HENDRYCKS_MATH = "EleutherAI/hendrycks_math"
# The hub publishes this dataset as one config per subject; the order fixes the concatenation order.
HENDRYCKS_CONFIGS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                     "number_theory", "prealgebra", "precalculus")
GSM8K_HUB_CONFIG = "main"
LOCAL_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    level: int
    subject: str


@dataclass
class LoadReport:
    """What a loader read and why rows were left out; invariant: rows == kept + sum(dropped)."""

    source: str
    rows: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.source}: {self.rows} rows, {self.kept} kept, dropped: {reasons}"

    def drop(self, reason: str, count: int = 1) -> None:
        """Move `count` kept rows to `reason` (used by filters applied after loading)."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            self.kept -= count


class _Skip(Exception):
    """Raised by a row converter: the row is unusable for the reason given."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- answer extraction ------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_ARGUMENT = re.compile(r"[^\s$]*")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] and the index after it; None if unclosed.

    Escaped braces (`\\{`, `\\}`, as in `\\left\\{`) are content, not grouping.
    """
    depth = 0
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 1
        elif text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def _bare_token(text: str, start: int) -> tuple[str, int]:
    """`\\boxed 5` form: the argument runs to whitespace or `$`; trailing sentence punctuation is not part of it."""
    match = _BARE_ARGUMENT.match(text, start)
    assert match is not None  # the pattern matches the empty string
    return match.group().rstrip(".,;:"), match.end()


def last_boxed(text: str) -> str | None:
    """Content of the last top-level `\\boxed{...}` / `\\fbox{...}` (nested braces kept), or None.

    `\\boxed 5` (no braces) is accepted as the plain LaTeX form. An unclosed `\\boxed{...` (e.g. a
    truncated completion) does not count, so an earlier complete box wins. Boxes nested inside a box
    are part of its content, not separate answers.
    """
    found: str | None = None
    pos = 0
    while (match := _BOX_COMMAND.search(text, pos)) is not None:
        pos = arg = match.end()
        while arg < len(text) and text[arg] in " \t":
            arg += 1
        if arg < len(text) and text[arg] == "{":
            group = _braced(text, arg)
        elif arg > match.end():
            group = _bare_token(text, arg)
        else:
            group = None
        if group is not None and group[0].strip():
            found, pos = group[0].strip(), group[1]
    return found


# ---- reading rows -----------------------------------------------------------------------------

def _is_local(source: str) -> bool:
    """An existing file, or a name with a local file suffix, is local.

    Anything else (a hub id, a local dataset folder) goes to `datasets`.
    """
    return Path(source).is_file() or source.endswith(LOCAL_SUFFIXES)


def _read_local(path: Path) -> list[dict[str, Any] | None]:
    """Rows of a .jsonl or .parquet file; None stands for a JSON line that is not an object."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [_parse_json_line(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"unsupported data file {path}: expected one of {LOCAL_SUFFIXES}")


def _parse_json_line(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _read_hub(source: str, split: str, configs: Sequence[str | None]) -> list[dict[str, Any] | None]:
    """Rows of a hub dataset split, concatenated over `configs` (imported lazily: `datasets` is slow to import)."""
    import datasets

    rows: list[dict[str, Any] | None] = []
    for config in configs:
        rows.extend(datasets.load_dataset(source, config, split=split))
    return rows


def _read_rows(source: str, split: str, hub_configs: Sequence[str | None]) -> list[dict[str, Any] | None]:
    return _read_local(Path(source)) if _is_local(source) else _read_hub(source, split, hub_configs)


def _id_prefix(source: str, split: str) -> str:
    """Prefix of index-based ids for rows without `unique_id`: the file stem, or the hub name and split."""
    return Path(source).stem if _is_local(source) else f"{source.rsplit('/', 1)[-1]}-{split}"


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
        try:
            if row is None:
                raise _Skip("bad_json")
            problem = convert(row, f"{id_prefix}-{index:06d}")
            if problem.id in seen:
                raise _Skip("duplicate_id")
        except _Skip as skip:
            dropped[skip.reason] += 1
            examples[skip.reason].append(index)
            continue
        seen.add(problem.id)
        problems.append(problem)
    for reason, count in sorted(dropped.items()):
        log.warning("%s: dropped %d row(s): %s (row indices e.g. %s)", source, count, reason, examples[reason][:5])
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


# ---- synthetic arithmetic curriculum ----------------------------------------------------------
# Each level draws (expression, value) pairs. The difficulty rises with the digits a character-level
# model must carry and the operations it must compose, not with the length of the text.

Term = tuple[str, int]


def _two_digit(rng: random.Random) -> int:
    return rng.randint(10, 99)


def _sum_of(rng: random.Random, terms: list[Term], ops: str) -> Term:
    """Join terms left to right with operators drawn from `ops`; products are single terms, so no precedence issues."""
    text, value = terms[0]
    for term_text, term_value in terms[1:]:
        op = rng.choice(ops)
        text += op + term_text
        value += term_value if op == "+" else -term_value
    return text, value


def _level1(rng: random.Random) -> Term:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}+{b}", a + b


def _level2(rng: random.Random) -> Term:
    terms = [(str(n), n) for n in (_two_digit(rng), rng.randint(0, 9))]
    rng.shuffle(terms)
    return _sum_of(rng, terms, "+")


def _level3(rng: random.Random) -> Term:
    a, b = _two_digit(rng), _two_digit(rng)
    return _sum_of(rng, [(str(a), a), (str(b), b)], "+-")


def _level4(rng: random.Random) -> Term:
    factors = [_two_digit(rng), rng.randint(2, 9)]
    rng.shuffle(factors)
    return f"{factors[0]}*{factors[1]}", factors[0] * factors[1]


def _level5(rng: random.Random) -> Term:
    """A two-digit-by-digit product combined with one or two two-digit terms, e.g. "37*8-45" or "12+37*8-45"."""
    product = _level4(rng)
    others = [(str(n), n) for n in (_two_digit(rng) for _ in range(rng.randint(1, 2)))]
    terms = [product, *others]
    rng.shuffle(terms)
    return _sum_of(rng, terms, "+-")


LEVEL_GENERATORS: dict[int, Callable[[random.Random], Term]] = {
    1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}
SYNTHETIC_SPLITS = ("train", "eval")
EVAL_SHARE_PERCENT = 20  # share of each level's expression space reserved for eval


def synthetic_split_of(expression: str, seed: int) -> str:
    """The split an expression belongs to, by a seeded hash: train and eval are disjoint by construction."""
    digest = hashlib.blake2b(f"{seed}|{expression}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") % 100 < EVAL_SHARE_PERCENT else "train"


def _draw_level(level: int, split: str, count: int, seed: int) -> list[Term]:
    """`count` distinct expressions of the split where the level's space allows; train tops up with repeats.

    Small levels (L1 has 100 expressions) cannot fill a large train request with distinct items, so
    train repeats them; eval stays distinct and may be smaller than requested.
    """
    rng = random.Random(f"lens-synthetic|{seed}|{split}|{level}")
    generate = LEVEL_GENERATORS[level]
    found: dict[str, int] = {}
    for _ in range(20 * count + 2000):
        if len(found) == count:
            break
        text, value = generate(rng)
        if text not in found and synthetic_split_of(text, seed) == split:
            found[text] = value
    unique = list(found.items())
    if split == "eval" or not unique:
        return unique
    return unique + [rng.choice(unique) for _ in range(count - len(unique))]


def synthetic_problems(
    split: str, per_level: int | Mapping[int, int], seed: int, levels: Iterable[int] = (1, 2, 3, 4, 5),
) -> list[Problem]:
    """Seeded arithmetic problems, levels in order; the same seed always gives the same list."""
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"synthetic split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
    problems: list[Problem] = []
    for level in levels:
        if level not in LEVEL_GENERATORS:
            raise ValueError(f"synthetic levels are 1..5, got {level}")
        if isinstance(per_level, Mapping) and level not in per_level:
            raise ValueError(f"per_level has no count for level {level}")
        count = per_level[level] if isinstance(per_level, Mapping) else per_level
        problems += [Problem(f"syn-L{level}-{split}-{i:06d}", text, str(value), level, "arithmetic")
                     for i, (text, value) in enumerate(_draw_level(level, split, count, seed))]
    return problems


# ---- persistence and prompts ------------------------------------------------------------------

def write_problems(path: str | os.PathLike[str], problems: Iterable[Problem]) -> None:
    """Write jsonl atomically (temp file + os.replace), so a crash never leaves a half-written dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for problem in problems:
                f.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_problems(path: str | os.PathLike[str]) -> list[Problem]:
    with open(path, encoding="utf-8") as f:
        return [Problem(**json.loads(line)) for line in f if line.strip()]


def render_prompt(problem: Problem, tokenizer: Any = None, chat_template: bool = False) -> str:
    """The plain `Q: ... A: ` prompt of the tiny model, or the tokenizer's chat template with INSTRUCTION."""
    if not chat_template:
        return PLAIN_TEMPLATE.format(problem=problem.problem)
    if tokenizer is None:
        raise ValueError("chat_template=True needs a tokenizer")
    messages = [{"role": "user", "content": problem.problem + "\n" + INSTRUCTION}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---- params-driven selection ------------------------------------------------------------------

def _locate(params: Params, path: str) -> str:
    """Local paths resolve against the project root; a hub id with no such local file passes unchanged."""
    resolved = params.resolve_path(path)
    return os.path.normpath(resolved) if resolved.exists() or path.endswith(LOCAL_SUFFIXES) else path


def _seeded_subset(problems: list[Problem], n: int, seed: str) -> set[str]:
    """Ids of the first `n` problems after a seeded shuffle: a deterministic, unbiased sample."""
    ids = [p.id for p in problems]
    random.Random(seed).shuffle(ids)
    return set(ids[:n])


def _cap(parts: list[tuple[list[Problem], LoadReport]], n: int, seed: str) -> list[tuple[list[Problem], LoadReport]]:
    """Keep `n` problems over all parts together, charging each part's report for what it lost as "capped"."""
    keep = _seeded_subset([p for problems, _ in parts for p in problems], n, seed)
    capped = []
    for problems, report in parts:
        kept = [p for p in problems if p.id in keep]
        report.drop("capped", len(problems) - len(kept))
        capped.append((kept, report))
    return capped


def _cap_per_level(problems: list[Problem], report: LoadReport, n: int, seed: str) -> list[Problem]:
    keep: set[str] = set()
    for level in sorted({p.level for p in problems}):
        keep |= _seeded_subset([p for p in problems if p.level == level], n, f"{seed}|L{level}")
    kept = [p for p in problems if p.id in keep]
    report.drop("capped", len(problems) - len(kept))
    return kept


def _synthetic_part(params: Params, split: str, levels: Iterable[int]) -> tuple[list[Problem], LoadReport]:
    syn = params.data.synthetic
    levels = list(levels)
    problems = synthetic_problems(split, syn.train_per_level if split == "train" else syn.eval_per_level,
                                  syn.seed, levels)
    source = f"synthetic(split={split}, levels={levels}, seed={syn.seed})"
    return problems, LoadReport(source, len(problems), len(problems), {})


def load_problems_for(params: Params, split: str) -> tuple[list[Problem], list[LoadReport]]:
    """The train or eval problems that `params` selects, with one report per source.

    data.levels filters MATH and GSM8K (level 1) everywhere and the synthetic source; a mixture
    uses data.mixture_synthetic_levels for its synthetic part. Eval keeps at most
    max_eval_problems_per_level per source and level, train at most max_train_problems over all
    sources; both choose by a shuffle seeded with run.seed and keep the original order.
    """
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
    data = params.data
    source = data.train_source if split == "train" else data.eval_source
    hub_split = "train" if split == "train" else "test"
    math_path = data.math_train_path if split == "train" else data.math_eval_path
    gsm8k_path = data.gsm8k_train_path if split == "train" else data.gsm8k_eval_path

    parts: list[tuple[list[Problem], LoadReport]] = []
    if source in ("synthetic", "mixture"):
        synthetic_levels = data.levels if source == "synthetic" else data.mixture_synthetic_levels
        parts.append(_synthetic_part(params, split, synthetic_levels))
    if source in ("gsm8k", "mixture"):
        parts.append(load_gsm8k(_locate(params, gsm8k_path), hub_split, data.levels))
    if source in ("math", "mixture"):
        parts.append(load_math(_locate(params, math_path), hub_split, data.levels))

    seed = f"{params.run.seed}|{split}"
    if split == "eval" and data.max_eval_problems_per_level is not None:
        parts = [(_cap_per_level(problems, report, data.max_eval_problems_per_level, seed), report)
                 for problems, report in parts]
    if split == "train" and data.max_train_problems is not None:
        parts = _cap(parts, data.max_train_problems, seed)
    for _, report in parts:
        log.info("%s", report.summary())
    return [p for problems, _ in parts for p in problems], [report for _, report in parts]
