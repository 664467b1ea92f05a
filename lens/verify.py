"""The reward function: is a completion's final answer mathematically equal to the gold answer?

Built on math-verify 0.9 (``parse`` + ``verify``, gold first). math-verify's own time limit uses
``signal.alarm`` and only works in the main thread, so it is always disabled here
(``parsing_timeout=None`` / ``timeout_seconds=None``) and the limit is enforced by scoring in the
worker processes of a :class:`~lens.deadline_pool.DeadlinePool` instead (per item: a soft limit inside
the worker, then a hard kill and a replacement worker). Everything in the calling process is
signal-free: ``score`` and ``Verifier.score_batch`` may be called from any thread.

Answer extraction (:func:`_score_one`, what a worker runs for one item)
    * the completion's LAST complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested and escaped braces
      handled; ``\\boxed 5`` too) is the answer. It is parsed as ``$<answer>$`` (falling back to
      ``\\boxed{<answer>}``) with math-verify's default extraction configs;
    * with no boxed answer, math-verify's own extraction runs on the whole completion
      (``parse(completion)``, default configs: LaTeX environments, "answer is ...", plain numbers);
    * the gold (a bare answer such as ``\\frac{1}{2}``, ``42``, ``(3, \\frac{\\pi}{2})``) is parsed the
      same way as a boxed answer (a gold that itself contains ``\\boxed`` is unwrapped first);
    * fast path: boxed answer == gold after whitespace normalisation -> 1.0 without comparing (the gold
      must still parse: a gold without a mathematical value, e.g. ``@#!``, never scores 1).
    A completion with no extractable answer gives 0.0 and counts as a ``parse_failure``. An exception
    inside math-verify, a gold without a mathematical value (:class:`GoldParseError`, also counted as a
    ``gold_error``) or a dead worker gives 0.0, counts as an ``error`` and is logged with the inputs
    truncated; ``score_batch(strict=True)`` raises :class:`VerifierError`.
    Identical (completion, gold) pairs within a batch are scored once, and each worker caches parsed
    answers / golds and (boxed answer, gold) results (LRU) across batches. Pathological completions are
    screened in the calling process first (:func:`lens.reward_health.screen`): cleaned and scored
    (``sanitized``), or given 0.0 without reaching math-verify (``rejected``).

Every worker runs a self-check (a boxed LaTeX fraction must verify against ``0.5``; this also warms
up the LaTeX parser) before it takes work, whatever the ``scorer``, so a broken install (e.g. an
incompatible antlr4 runtime, which makes every LaTeX answer unparseable) raises
:class:`VerifierError` instead of silently giving reward 0.

Test hook: ``Verifier(scorer=fn)`` makes the workers call ``fn(completion, gold)`` instead of
:func:`_score_one`. ``fn`` must be a picklable top-level function and follow ``_score_one``'s contract:
return the reward (1.0 / 0.0; bools accepted), ``None`` for "no extractable answer", or raise.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lens.data import last_boxed as extract_boxed  # one answer extractor for data, reward and warm start
from lens.deadline_pool import DIED, ERROR, TIMEOUT, VALUE, DeadlinePool, DeadlinePoolError, Outcome, run_inline
from lens.reward_health import MAX_COMPLETION_CHARS, clean_text, screen

log = logging.getLogger(__name__)

__all__ = ["MAX_TIMEOUT_S", "GoldParseError", "Verifier", "VerifierError", "VerifyStats", "check_gold",
           "extract_boxed", "score", "shutdown_shared"]

Scorer = Callable[[str, str], "float | bool | None"]

_TRUNC = 200  # characters of an input shown in log messages
_MAX_LOGGED_PER_BATCH = 5  # individual error warnings per batch (then one summary line)
# signal.setitimer overflows above ~1e9 s (and at inf), which made every item an error, every reward 0.
MAX_TIMEOUT_S = 3600.0


class VerifierError(RuntimeError):
    """The verifier failed internally (strict mode), or its worker processes cannot start."""


class GoldParseError(VerifierError):
    """A gold answer has no mathematical value math-verify can parse: no completion can match it."""


@dataclass
class VerifyStats:
    """Counters. ``calls`` counts items; every item is exactly one of correct / wrong /
    ``parse_failures`` / ``timeouts`` / ``errors`` / ``rejected`` (wrong = the rest). ``gold_errors``
    counts the errors whose gold answer did not parse; ``sanitized`` the items whose completion had NUL
    bytes or invalid UTF-8 removed before scoring; ``worker_restarts`` the worker processes replaced
    after a hard timeout or a crash."""

    calls: int = 0
    correct: int = 0
    timeouts: int = 0
    parse_failures: int = 0
    errors: int = 0
    worker_restarts: int = 0
    rejected: int = 0
    gold_errors: int = 0
    sanitized: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def add(self, other: VerifyStats) -> None:
        """Add ``other``'s counts to these."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ---------------------------------------------------------------------------------------------
# answer extraction and scoring of one item (runs in the workers)
# ---------------------------------------------------------------------------------------------
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


_MV: tuple[Any, Any] | None = None


def _math_verify() -> tuple[Any, Any]:
    """(parse, verify), imported lazily so that importing lens.verify stays cheap."""
    global _MV
    if _MV is None:
        import math_verify
        from math_verify import grader, parser

        # We enforce time limits ourselves; silence the one-time "Timeout is disabled" warning.
        for mod in (parser, grader):
            if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
                mod.TIMEOUT_WARNING_SHOWN = True
        _MV = (math_verify.parse, math_verify.verify)
    return _MV


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    """Parse a bare answer (boxed content or a gold): ``$answer$``, else ``\\boxed{answer}``.
    Cached: in GRPO every gold repeats G times and boxed answers repeat a lot."""
    parse, _ = _math_verify()
    ans = _UNESCAPED_DOLLAR_RE.sub(" ", answer).replace("\n", " ").strip()
    if not ans:
        return ()
    out = parse(f"${ans}$", parsing_timeout=None, raise_on_error=True)
    if not out:
        out = parse(f"\\boxed{{{ans}}}", parsing_timeout=None, raise_on_error=True)
    return tuple(out)


def _parse_gold(gold: str) -> tuple:
    inner = extract_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else None
    return _parse_answer(inner if inner is not None else gold)


def _gold_or_raise(gold: str) -> tuple:
    """The parsed gold, or GoldParseError. math-verify falls back to the raw string when LaTeX parsing
    fails (`@#!`, `\\frac{1}{`), and a string gold would only match by string equality: not a value."""
    try:
        gold_parsed = _parse_gold(gold)
    except Exception as exc:  # an unparseable gold, whatever math-verify raised
        raise GoldParseError(f"gold answer cannot be parsed ({type(exc).__name__}: {exc}): {_trunc(gold)!r}") from exc
    if all(isinstance(value, str) for value in gold_parsed):
        raise GoldParseError(f"gold answer has no extractable value: {_trunc(gold)!r}")
    return gold_parsed


def check_gold(gold: str) -> None:
    """GoldParseError unless ``gold`` parses (no time limit: run it in a DeadlinePool, as lens.data.gold_check)."""
    _gold_or_raise(clean_text(gold)[0])


def _verify_any(gold: Sequence, pred: Sequence) -> bool:
    """math-verify's ``verify(gold_list, pred_list)`` (any pair equal), but with exceptions raised:
    a pair that raises does not hide a later pair that matches; if nothing matches, the first
    exception propagates (so it is counted as an error, never a silent 0)."""
    _, verify = _math_verify()
    first_exc: BaseException | None = None
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=None, raise_on_error=True):
                    return True
            except Exception as exc:  # noqa: BLE001 - re-raised below unless a later pair matches
                first_exc = first_exc or exc
    if first_exc is not None:
        raise first_exc
    return False


def _score_one(completion: str, gold: str) -> float | None:
    """Reward of one completion: 1.0 / 0.0, or None when it has no extractable answer at all.
    Raises on internal errors (math-verify exceptions, unparseable gold). No time limit of its own."""
    answer = extract_boxed(completion)
    if answer is None:
        return _score_unboxed(completion, gold)
    _gold_or_raise(gold)  # cached; an unparseable gold never scores, not even by the fast path
    if _norm_ws(answer) and _norm_ws(answer) == _norm_ws(gold):
        return 1.0
    return _score_answer(answer, gold)


@functools.lru_cache(maxsize=8192)
def _score_answer(answer: str, gold: str) -> float | None:
    """A boxed answer against a gold. Cached per worker: the same (wrong) answers to a problem recur
    across samples and steps, and sympy's simplify dominates the cost of a wrong answer.
    (Exceptions and interrupted calls are not cached.)"""
    gold_parsed = _gold_or_raise(gold)
    pred = _parse_answer(answer)
    if not pred:
        return None
    return 1.0 if _verify_any(gold_parsed, pred) else 0.0


def _score_unboxed(completion: str, gold: str) -> float | None:
    gold_parsed = _gold_or_raise(gold)
    parse, _ = _math_verify()
    pred = parse(completion, parsing_timeout=None, raise_on_error=True)
    if not pred:
        return None
    return 1.0 if _verify_any(gold_parsed, pred) else 0.0


def _self_check() -> None:
    """Fail loudly when math-verify cannot parse LaTeX (e.g. an incompatible antlr4 runtime)."""
    import sympy

    got = _parse_answer("\\frac{1}{2}")
    if not got or not isinstance(got[0], sympy.Basic):
        raise VerifierError(
            f"math-verify self-check failed: parse('$\\frac{{1}}{{2}}$') -> {got!r}; LaTeX parsing is "
            "broken (is the antlr4 runtime the one math-verify[antlr4_9_3] pins?)")
    r = _score_one("so \\boxed{\\frac{\\sqrt{4}}{4}}", "0.5")
    if r != 1.0:
        raise VerifierError(f"math-verify self-check failed: \\frac{{\\sqrt{{4}}}}{{4}} vs 0.5 scored {r!r}")


def _as_reward(scorer: Scorer, completion: str, gold: str) -> float | None:
    """What a worker runs per item: the scorer's reward as a float (None: no extractable answer)."""
    value = scorer(completion, gold)
    return None if value is None else float(value)


_REJECTED = "rejected"  # an Outcome kind of our own: the item never reached a worker


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"verifier timeout_s must be in (0, {MAX_TIMEOUT_S:g}] seconds or None, got {timeout_s}")


def _reward(outcome: Outcome) -> float:
    return float(outcome.value) if outcome.kind == VALUE and outcome.value is not None else 0.0


def _trunc(s: str) -> str:
    return s if len(s) <= _TRUNC else s[:_TRUNC] + f"...[{len(s) - _TRUNC} more chars]"


def _count(outcomes: Sequence[Outcome], into: VerifyStats) -> tuple[list[int], list[tuple[int, str]]]:
    """Count each item's outcome in ``into``; returns (timed-out indices, [(index, error)])."""
    timeouts: list[int] = []
    errors: list[tuple[int, str]] = []
    for i, outcome in enumerate(outcomes):
        into.calls += 1
        if outcome.kind == TIMEOUT:
            into.timeouts += 1
            timeouts.append(i)
        elif outcome.kind == _REJECTED:
            into.rejected += 1
        elif outcome.kind in (ERROR, DIED):
            into.errors += 1
            into.gold_errors += (outcome.error or "").startswith(f"{GoldParseError.__name__}:")
            errors.append((i, outcome.error))
        elif outcome.value is None:
            into.parse_failures += 1
        elif _reward(outcome) > 0:
            into.correct += 1
    return timeouts, errors


class Verifier:
    """Parallel reward computation with a per-item time limit; safe to use from any thread.

    ``Verifier(timeout_s=5.0, workers=2)``: ``workers`` spawn-context processes, started now and
    kept alive until :meth:`close` (or the end of a ``with`` block, or interpreter exit).
    ``workers=0``: score in the calling thread, no time limit (debugging only).

    Keyword-only options: ``max_completion_chars`` (longer completions are rejected unverified),
    ``scorer`` (test hook, see the module doc); ``chunk_size`` and ``kill_grace_s`` as in
    :class:`~lens.deadline_pool.DeadlinePool`. ``timeout_s`` is at most :data:`MAX_TIMEOUT_S`.
    ``stats`` accumulates over all calls; ``last_batch_stats`` holds the counts of the latest
    ``score_batch`` call only (per-step metrics). Concurrent ``score_batch`` calls are serialised.
    """

    def __init__(self, timeout_s: float | None = 5.0, workers: int = 2, *,
                 max_completion_chars: int = MAX_COMPLETION_CHARS, scorer: Scorer | None = None,
                 chunk_size: int | None = None, kill_grace_s: float | None = None):
        _check_timeout(timeout_s)
        self.timeout_s = timeout_s
        self.max_completion_chars = max_completion_chars
        self.workers = workers
        self.chunk_size = chunk_size
        self.kill_grace_s = kill_grace_s
        self.stats = VerifyStats()
        self.last_batch_stats = VerifyStats()
        self._lock = threading.Lock()
        self._pool = DeadlinePool(functools.partial(_as_reward, scorer or _score_one), workers,
                                  timeout_s=timeout_s, initializer=_self_check, chunk_size=chunk_size,
                                  kill_grace_s=kill_grace_s, name="lens-verify")

    def close(self) -> None:
        """Stop the workers (idempotent). Later ``score_batch`` calls raise."""
        self._pool.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def __repr__(self) -> str:
        return f"Verifier(timeout_s={self.timeout_s}, workers={self.workers}, stats={self.stats.as_dict()})"

    def score_batch(self, completions: Sequence[str], golds: Sequence[str], *, strict: bool = False,
                    timeout_s: float | None | type[...] = ...) -> list[float]:
        """Rewards (1.0 / 0.0) in input order. ``timeout_s`` overrides the per-item limit for this
        call (``None``: no limit). Timeouts, parse failures and internal errors all give 0.0 and are
        counted in ``stats`` and ``last_batch_stats``; errors are also logged. ``strict=True`` raises
        :class:`VerifierError` after the batch (stats already updated) if any item had an internal error."""
        rewards, _ = self.score_with_stats(completions, golds, strict=strict, timeout_s=timeout_s)
        return rewards

    def score_with_stats(self, completions: Sequence[str], golds: Sequence[str], *, strict: bool = False,
                         timeout_s: float | None | type[...] = ...) -> tuple[list[float], VerifyStats]:
        """``score_batch`` and this call's own counts (``last_batch_stats`` may already describe a later call
        from another thread: lens.scoring scores in the background)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        t = self.timeout_s if timeout_s is ... else timeout_s
        _check_timeout(t)
        screened = [screen(c, g, self.max_completion_chars) for c, g in zip(completions, golds)]
        pairs = [(c, g) for c, g, _, _ in screened]
        rejected = [(i, why) for i, (_, _, why, _) in enumerate(screened) if why is not None]
        index: dict[tuple[str, str], int] = {}  # identical pairs are scored once
        where = [None if why is not None else index.setdefault((c, g), len(index)) for c, g, why, _ in screened]
        with self._lock:
            batch = VerifyStats(sanitized=sum(s for _, _, _, s in screened))
            restarts_before = self._pool.restarts
            try:
                unique_outcomes = self._pool.run(list(index), timeout_s=t)
                outcomes = [Outcome(_REJECTED) if j is None else unique_outcomes[j] for j in where]
                timeouts, errors = _count(outcomes, batch)
            except DeadlinePoolError as exc:
                raise VerifierError(str(exc)) from exc
            finally:  # workers replaced before a failure are counted too
                batch.worker_restarts = self._pool.restarts - restarts_before
                self.stats.add(batch)
                self.last_batch_stats = batch
        _log_problems(pairs, timeouts, errors, rejected, t)
        if strict and errors:
            i, err = errors[0]
            c, g = pairs[i]
            raise VerifierError(f"{len(errors)} internal verifier error(s) in a batch of {len(pairs)}; "
                                f"first: {err}; completion={_trunc(c)!r} gold={_trunc(g)!r}")
        return [_reward(o) for o in outcomes], batch


def _log_problems(pairs: list[tuple[str, str]], timeouts: list[int], errors: list[tuple[int, str]],
                  rejected: list[tuple[int, str]], t: float | None) -> None:
    if rejected:
        i, why = rejected[0]
        log.warning("verifier: %d of %d completion(s) rejected unverified, reward 0.0; first: %s; completion=%r",
                    len(rejected), len(pairs), why, _trunc(pairs[i][0]))
    if timeouts:
        c, g = pairs[timeouts[0]]
        log.warning("verifier: %d of %d item(s) timed out (limit %ss); first: completion=%r gold=%r",
                    len(timeouts), len(pairs), t, _trunc(c), _trunc(g))
    for i, err in errors[:_MAX_LOGGED_PER_BATCH]:
        c, g = pairs[i]
        log.warning("verifier: internal error, reward 0.0: %s; completion=%r gold=%r", err, _trunc(c), _trunc(g))
    if len(errors) > _MAX_LOGGED_PER_BATCH:
        log.warning("verifier: %d more internal error(s) in this batch not shown",
                    len(errors) - _MAX_LOGGED_PER_BATCH)


# ---------------------------------------------------------------------------------------------
# one-off scoring
# ---------------------------------------------------------------------------------------------
_SHARED: Verifier | None = None
_SHARED_LOCK = threading.Lock()


def _shared_verifier() -> Verifier:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.closed or _SHARED._pool.owner_pid != os.getpid():
            _SHARED = Verifier(timeout_s=5.0, workers=1)
        return _SHARED


def shutdown_shared() -> None:
    """Close the worker behind :func:`score` (it is also closed at interpreter exit)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None and _SHARED._pool.owner_pid == os.getpid():
            _SHARED.close()
        _SHARED = None


def score(completion: str, gold: str, timeout_s: float | None = 5.0) -> float:
    """Reward of one completion (1.0 / 0.0). With a time limit it runs in a shared single worker
    process (thread-safe; calls are serialised); ``timeout_s=None`` scores in the calling thread
    with no limit. Timeouts and internal errors give 0.0 (errors are logged)."""
    if timeout_s is None:
        c, g, why, _ = screen(completion, gold, MAX_COMPLETION_CHARS)
        if why is not None:
            log.warning("verifier: completion rejected unverified, reward 0.0: %s", why)
            return 0.0
        outcome = run_inline(_as_reward, _score_one, c, g)
        if outcome.kind == ERROR:
            log.warning("verifier: internal error, reward 0.0: %s; completion=%r gold=%r",
                        outcome.error, _trunc(c), _trunc(g))
        return _reward(outcome)
    return _shared_verifier().score_batch([completion], [gold], timeout_s=timeout_s)[0]
