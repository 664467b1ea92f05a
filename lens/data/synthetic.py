"""A seeded arithmetic curriculum in five levels, with train and eval disjoint by construction.

Each level draws (expression, value) pairs. The difficulty rises with the digits a character-level
model must carry and the operations it must compose, not with the length of the text. The split is
decided on the expression's canonical form, so `12*3` (train) never answers `3*12` (eval).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Mapping

from lens.data.problems import Problem

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


_SIGNED_TERM = re.compile(r"([+-]?)([^+-]+)")


def canonical_form(expression: str) -> str:
    """The expression up to commutativity: its signed terms sorted, each product's factors sorted.

    `3*12` and `12*3` give "+3*12"; `12+37*8-45` and `37*8+12-45` give "+12+8*37-45". Expressions with the
    same form have the same value by the same steps, so they must not straddle train and eval.
    """
    terms = [(sign or "+") + "*".join(sorted(term.split("*"), key=int))
             for sign, term in _SIGNED_TERM.findall(expression)]
    return "".join(sorted(terms))


def synthetic_split_of(expression: str, seed: int) -> str:
    """The split an expression belongs to, by a seeded hash of its canonical form: train and eval are
    disjoint by construction, also up to commutativity."""
    digest = hashlib.blake2b(f"{seed}|{canonical_form(expression)}".encode(), digest_size=8).digest()
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
