"""The installed `vit-atlas` script, run in a subprocess as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def vit_atlas(*args: str, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`vit-atlas ARGS` from beside this interpreter, offline, with ``env`` added to this environment."""
    script = Path(sys.executable).with_name("vit-atlas")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
