"""Errors a user can fix. Every entry point turns them into one paragraph and exit 2."""

from __future__ import annotations

import sys
from typing import Callable

EXIT_BAD_INPUT = 2


class PipelineError(Exception):
    """An error the user can fix; its message is one paragraph that says what and how."""


def reporting_errors(work: Callable[[], int | None]) -> int:
    """Run an entry point's work; a PipelineError becomes one paragraph on stderr and exit status 2."""
    try:
        return work() or 0
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

