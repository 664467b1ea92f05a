"""The `Problem` record every source is normalised to, its jsonl files, and the prompts rendered from it.

A prompt is the user message (the problem, then `model.prompt.instruction` after a space, as verl's MATH
preprocessing does) rendered through the plain `Q: ... A: ` template or the tokenizer's chat template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lens.params import PromptParams

PLAIN_TEMPLATE = "Q: {problem}\nA: "
# verl's MATH prompt (examples/data_preprocess/math_dataset.py), the paper's framework.
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
UNRATED_LEVEL = 0  # the level of problems without a difficulty rating (DAPO-Math-17k); MATH's are 1..5


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
    rules: dict[str, str] = field(default_factory=dict)  # how a deliberate selection decided, by reason

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.source}: {self.rows} rows, {self.kept} kept, dropped: {reasons}"

    def drop(self, reason: str, count: int = 1, rule: str | None = None) -> None:
        """Move `count` kept rows to `reason` (used by filters applied after loading); `rule` says how the
        filter decided, for report.json."""
        if rule is not None:
            self.rules[reason] = rule
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            self.kept -= count


def write_problems(path: str | os.PathLike[str], problems: Iterable[Problem]) -> None:
    """Write jsonl atomically, so a crash never leaves a half-written dataset."""
    from lens.records import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in problems))


def read_problems(path: str | os.PathLike[str]) -> list[Problem]:
    """The problems of a file write_problems wrote; a line that is not one raises ValueError naming it."""
    problems = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    problems.append(_problem(json.loads(raw.decode("utf-8"))))
                except (ValueError, TypeError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                    raise ValueError(f"{path} line {number}: not a problem record ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None
    return problems


def _problem(row: Any) -> Problem:
    types = {"id": str, "problem": str, "answer": str, "level": int, "subject": str}
    if not isinstance(row, dict) or set(row) != set(types):
        raise ValueError(f"expected an object with exactly the keys {sorted(types)}")
    wrong = [k for k, t in types.items() if type(row[k]) is not t]
    if wrong:
        raise TypeError(f"wrong type for {', '.join(wrong)}")
    return Problem(**row)


def user_message(problem: Problem, instruction: str = "") -> str:
    """The problem, then the instruction after a space (verl: `question + ' ' + instruction_following`)."""
    return f"{problem.problem} {instruction}" if instruction else problem.problem


def render_prompt(problem: Problem, tokenizer: Any = None, prompt: PromptParams | None = None) -> str:
    """The prompt `prompt` (model.prompt; None: plain, no instruction) makes of `problem`.

    plain: PLAIN_TEMPLATE around the user message, no tokenizer needed. chat: the tokenizer's chat template
    with the user message as the only turn and the assistant's turn opened.
    """
    template, instruction = (prompt.template, prompt.instruction) if prompt is not None else ("plain", "")
    message = user_message(problem, instruction)
    if template == "plain":
        return PLAIN_TEMPLATE.format(problem=message)
    if tokenizer is None:
        raise ValueError("model.prompt.template=chat needs the model's tokenizer to render a prompt")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
