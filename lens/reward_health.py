"""Reward health: garbage in the reward is stopped (or warned about loudly), never trained on.

Per completion, before verification (:func:`screen`, used by lens.verify): text is cleaned (NUL bytes,
invalid UTF-8) and a pathological completion (too long, braces nested too deep) gets 0 without reaching
math-verify, whose time on such input is unbounded. Per step (:class:`RewardHealth`): a batch whose
verifier error + timeout rate passes ``verify.max_error_rate``, or rewards that stay all 0 for
``verify.zero_reward_alarm_steps`` steps while the gold answers parse, raise :class:`RewardHealthError`
(``verify.on_unhealthy=stop``) or log a loud warning (``warn``).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lens.params import VerifyParams
    from lens.verify import VerifyStats

log = logging.getLogger(__name__)

# Longest completion scored by default: 4,096 tokens (the paper's max_new_tokens) at up to ~24 characters each.
MAX_COMPLETION_CHARS = 100_000
# math-verify's LaTeX parser takes time exponential in nested bare braces (`{{{1}}}`): 0.6 s at depth 10,
# 8 s at 14, 270 s at 20. MATH's gold answers nest braces at most 2 deep, its solutions 5.
MAX_BRACE_DEPTH = 10

_INNERMOST_GROUP = re.compile(r"\{[^{}]*\}")
_ESCAPED_BRACE = re.compile(r"\\[{}]")


def clean_text(value: Any) -> tuple[str, bool]:
    """(text, whether it had to be changed): bytes decoded as UTF-8, NUL bytes removed, invalid UTF-8
    (undecodable bytes, lone surrogates) replaced by U+FFFD. A NUL-laden answer is still an answer, but
    lone surrogates cannot be written to parquet or JSON."""
    if value is None:
        return "", False
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        changed = text.encode("utf-8") != bytes(value)
    else:
        text, changed = str(value), False
    if "\x00" in text:
        text, changed = text.replace("\x00", ""), True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text, changed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), True
    return text, changed


def braces_too_deep(text: str, limit: int = MAX_BRACE_DEPTH) -> bool:
    """Whether (unescaped) braces nest deeper than ``limit``: peels innermost groups, one regex pass per
    level, so a megabyte of braces costs milliseconds."""
    text = _ESCAPED_BRACE.sub("", text)
    for _ in range(limit):
        text, peeled = _INNERMOST_GROUP.subn("", text)
        if not peeled:
            return False
    return _INNERMOST_GROUP.search(text) is not None


def screen(completion: Any, gold: Any, max_chars: int = MAX_COMPLETION_CHARS) -> tuple[str, str, str | None, bool]:
    """(completion, gold, why the item must score 0 unverified or None, whether the completion was cleaned)."""
    text, cleaned = clean_text(completion)
    why = None
    if len(text) > max_chars:
        why = f"completion longer than {max_chars} characters ({len(text)})"
    elif "{" in text and braces_too_deep(text):
        why = f"braces nested deeper than {MAX_BRACE_DEPTH}"
    return text, clean_text(gold)[0], why, cleaned


class RewardHealthError(RuntimeError):
    """A step's rewards are garbage (verify.on_unhealthy=stop); the message names the threshold key."""


class RewardHealth:
    """Checks each step's verifier counts; keeps the count of consecutive all-zero-reward steps.

    ``RewardHealth.from_params(params.verify)``; ``check(stats, step)`` after every step's verification
    with that step's :class:`~lens.verify.VerifyStats` (summed over processes, so that every rank decides
    alike) returns the problems found (empty: healthy), after raising or warning about them. The
    consecutive count starts at 0 with the object (a resumed run counts afresh).
    """

    def __init__(self, max_error_rate: float = 0.5, zero_reward_alarm_steps: int = 50,
                 on_unhealthy: Literal["stop", "warn"] = "stop"):
        if not 0 <= max_error_rate <= 1:
            raise ValueError(f"verify.max_error_rate must be in [0, 1], got {max_error_rate}")
        if zero_reward_alarm_steps < 0:
            raise ValueError(f"verify.zero_reward_alarm_steps must be >= 0, got {zero_reward_alarm_steps}")
        if on_unhealthy not in ("stop", "warn"):
            raise ValueError(f"verify.on_unhealthy must be stop or warn, got {on_unhealthy!r}")
        self.max_error_rate = max_error_rate
        self.zero_reward_alarm_steps = zero_reward_alarm_steps
        self.on_unhealthy = on_unhealthy
        self.zero_reward_steps = 0  # consecutive steps whose rewards were all 0 while golds parsed

    @classmethod
    def from_params(cls, verify: VerifyParams) -> RewardHealth:
        return cls(verify.max_error_rate, verify.zero_reward_alarm_steps, verify.on_unhealthy)

    def check(self, stats: VerifyStats, step: int) -> list[str]:
        calls = int(stats.calls)
        if not calls:
            return []
        counts = (f"errors={int(stats.errors)} (gold_errors={int(stats.gold_errors)}), "
                  f"timeouts={int(stats.timeouts)}, rejected={int(stats.rejected)}, "
                  f"parse_failures={int(stats.parse_failures)}, correct={int(stats.correct)}, items={calls}")
        problems = []
        failed = int(stats.errors + stats.timeouts)
        if failed / calls > self.max_error_rate:
            problems.append(f"step {step}: verifier errors + timeouts {failed}/{calls} = {failed / calls:.0%} > "
                            f"verify.max_error_rate={self.max_error_rate:g} ({counts})")
        # All 0 although some gold parsed: the policy or the verifier is broken (all golds failing is an
        # error rate of 100%, reported above).
        all_zero = stats.correct == 0 and stats.gold_errors < calls
        self.zero_reward_steps = self.zero_reward_steps + 1 if all_zero else 0
        n = self.zero_reward_alarm_steps
        if n and self.zero_reward_steps >= n:
            problems.append(f"step {step}: rewards all 0 for {self.zero_reward_steps} consecutive steps "
                            f"(verify.zero_reward_alarm_steps={n}) while the gold answers parse ({counts})")
        if problems and self.on_unhealthy == "stop":
            raise RewardHealthError("unhealthy rewards, run stopped (verify.on_unhealthy=stop; "
                                    f"verify.on_unhealthy=warn trains on): {'; '.join(problems)}")
        for problem in problems:
            log.warning("UNHEALTHY REWARDS (verify.on_unhealthy=warn, training on): %s", problem)
        return problems
