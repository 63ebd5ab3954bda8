"""Command lines printed for the user to run: they work as printed, in a new shell.

Apart from pipeline.cli so that a stage can print a command (the sweep prints how to see
its store) without importing the command registry, which imports the stages.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def shell_command(name: str, *overrides: str) -> str:
    """``vit-atlas NAME OVERRIDES...`` with this environment's vit-atlas script where it exists, else this
    interpreter with ``-m pipeline``: a virtual environment need not be on PATH."""
    script = Path(sys.executable).with_name("vit-atlas")
    head = [str(script), name] if script.is_file() else [sys.executable, "-m", "pipeline", name]
    return shlex.join([*head, *overrides])
