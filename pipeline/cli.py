"""``key=value`` command lines for the small read-side tools (atlas, figures).

These tools take a handful of plain settings, so they parse ``key=value``
arguments directly instead of composing a Hydra config; the spelling
(``store.root=DIR``) matches the sweep's so one store root can be pasted into both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.errors import PipelineError, reporting_errors


def parse_key_values(argv: list[str], usage: str, required: tuple[str, ...],
                     optional: dict[str, str]) -> dict[str, str]:
    """Settings from ``key=value`` arguments; optional keys default to the given values."""
    settings: dict[str, str] = {}
    known = set(required) | set(optional)
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep or not key:
            raise PipelineError(f"Argument {argument!r} is not of the form key=value. {usage}")
        if key not in known:
            raise PipelineError(f"Unknown setting {key!r}; the settings are {', '.join(sorted(known))}. {usage}")
        if key in settings:
            raise PipelineError(f"Setting {key!r} is given twice; give it once. {usage}")
        settings[key] = value
    missing = [key for key in required if not settings.get(key)]
    if missing:
        raise PipelineError(f"Missing required setting(s) {', '.join(missing)}. {usage}")
    return {**optional, **settings}


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> int:
    """Run a tool's main; a PipelineError becomes one paragraph on stderr and exit status 2."""
    return reporting_errors(lambda: main(sys.argv[1:] if argv is None else argv))
