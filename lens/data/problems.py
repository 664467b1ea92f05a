"""The `Problem` record every source is normalised to, its jsonl files, and the prompts rendered from it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

PLAIN_TEMPLATE = "Q: {problem}\nA: "
INSTRUCTION = "Put your final answer within \\boxed{}."


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


def write_problems(path: str | os.PathLike[str], problems: Iterable[Problem]) -> None:
    """Write jsonl atomically, so a crash never leaves a half-written dataset."""
    from lens.records import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in problems))


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
