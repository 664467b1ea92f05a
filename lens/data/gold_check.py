"""Gold answers the verifier cannot parse (`@#!`, `\\frac{1}{`): no completion could ever score 1 on them.

`lens prepare` drops their problems, counted as "unparseable_gold" and warned about with examples, rather
than refusing the dataset: real sets have a few (MATH train: `a + b + c`, `\\sin^2 t`), and a
problem no answer can match only adds all-wrong groups to training and a miss no policy can fix to
evaluation. The check is lens.verify's own gold parser (`check_gold`), run in worker processes under the
verifier's time limit (a gold such as `{{{...{1}...}}}` would otherwise hang prepare).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from lens.data.problems import Problem
from lens.data.registry import SourcePart
from lens.deadline_pool import VALUE, DeadlinePool

log = logging.getLogger(__name__)

REASON = "unparseable_gold"
RULE = "lens.verify finds no mathematical value in the gold answer within verify.timeout_s (it could never score 1)"
_SHOWN = 5  # examples per warning


class GoldCheck:
    """``GoldCheck(timeout_s, workers)``: a context manager holding the checking processes for several
    calls. ``dropped`` lists every problem dropped so far as {"source", "id", "answer", "why"}."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 1):
        from lens.verify import _self_check, check_gold

        self._pool = DeadlinePool(check_gold, workers, timeout_s=timeout_s, initializer=_self_check,
                                  name="lens-gold-check")
        self._why: dict[str, str | None] = {}  # answer -> why it does not parse (None: it does)
        self.dropped: list[dict[str, str]] = []

    def unparseable(self, answers: Iterable[str]) -> dict[str, str]:
        """{answer: why} for those of ``answers`` that do not parse (each distinct answer is checked once)."""
        answers = list(answers)
        new = list(dict.fromkeys(a for a in answers if a not in self._why))
        for answer, outcome in zip(new, self._pool.run([(a,) for a in new])):
            self._why[answer] = None if outcome.kind == VALUE else (
                outcome.error or f"{outcome.kind}: no answer within verify.timeout_s={self._pool.timeout_s:g}")
        return {a: why for a in answers if (why := self._why[a]) is not None}

    def drop_unparseable(self, parts: list[SourcePart]) -> list[SourcePart]:
        """Each part without its problems whose gold does not parse, counted in its report and warned about."""
        kept_parts = []
        for problems, report in parts:
            bad = self.unparseable(p.answer for p in problems)
            kept = [p for p in problems if p.answer not in bad]
            dropped = [p for p in problems if p.answer in bad]
            report.drop(REASON, len(dropped), RULE)
            if dropped:
                examples = ", ".join(f"{p.id}={p.answer!r}" for p in dropped[:_SHOWN])
                log.warning("%s: dropped %d problem(s): %s, the verifier cannot parse their gold answer (e.g. %s)",
                            report.source, len(dropped), REASON, examples)
            self.dropped += [{"source": report.source, "id": p.id, "answer": p.answer, "why": bad[p.answer]}
                             for p in dropped]
            kept_parts.append(SourcePart(kept, report))
        return kept_parts

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> GoldCheck:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unparseable_golds(problems: Iterable[Problem], timeout_s: float = 5.0, workers: int = 1) -> list[tuple[str, str]]:
    """(problem id, answer) of each problem whose gold answer the verifier cannot parse."""
    problems = list(problems)
    with GoldCheck(timeout_s, workers) as check:
        bad = check.unparseable(p.answer for p in problems)
    return [(p.id, p.answer) for p in problems if p.answer in bad]
