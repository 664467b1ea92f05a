"""The registry of data sources: a name in data.train_source / data.eval_source -> the loader that reads it.

A loader takes the resolved params and the split ("train" or "eval") and returns one `SourcePart` per
dataset it read, so that caps and reports stay per dataset (a mixture returns several). Registering and
listing import no dataset library, so params validation checks names cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from lens.data.problems import LoadReport, Problem

if TYPE_CHECKING:
    from lens.params import Params


class SourcePart(NamedTuple):
    problems: list[Problem]
    report: LoadReport


Loader = Callable[["Params", str], list[SourcePart]]

_SOURCES: dict[str, Loader] = {}


def register_source(name: str, loader: Loader | None = None) -> Callable[[Loader], Loader] | Loader:
    """Register `loader` under `name`: `register_source(name, loader)` or `@register_source(name)`."""
    def register(fn: Loader) -> Loader:
        if name in _SOURCES and _SOURCES[name] is not fn:
            raise ValueError(f"data source {name!r} is already registered")
        _SOURCES[name] = fn
        return fn

    return register if loader is None else register(loader)


def source_names() -> list[str]:
    return sorted(_SOURCES)


def get_source(name: str) -> Loader:
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown data source {name!r}; registered: {', '.join(source_names())}") from None
