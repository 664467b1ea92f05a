"""The final answer of a MATH solution or a model completion: the last top-level `\\boxed{...}`."""

from __future__ import annotations

import re

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
