"""The final answer of a MATH solution or a model completion: the last top-level `\\boxed{...}`."""

from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_ARGUMENT = re.compile(r"[^\s$]*")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def _group_ends(text: str) -> dict[int, int]:
    """Index of each closed `{` -> the index after its matching `}`, in one pass (linear: scanning to the end
    from every unclosed `\\boxed{` made a completion of many of them quadratic, seconds for 45 KB).

    Escaped braces (`\\{`, `\\}`, as in `\\left\\{`) are content, not grouping.
    """
    ends: dict[int, int] = {}
    opened: list[int] = []
    for match in _BRACE_OR_ESCAPE.finditer(text):
        if match.group() == "{":
            opened.append(match.start())
        elif match.group() == "}" and opened:
            ends[opened.pop()] = match.end()
    return ends


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
    ends: dict[int, int] | None = None
    pos = 0
    while (match := _BOX_COMMAND.search(text, pos)) is not None:
        pos = arg = match.end()
        while arg < len(text) and text[arg] in " \t":
            arg += 1
        group = None
        if arg < len(text) and text[arg] == "{":
            ends = _group_ends(text) if ends is None else ends
            if arg in ends:
                group = text[arg + 1:ends[arg] - 1], ends[arg]
        elif arg > match.end():
            group = _bare_token(text, arg)
        if group is not None and group[0].strip():
            found, pos = group[0].strip(), group[1]
    return found
