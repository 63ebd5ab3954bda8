"""``python -m pipeline.zoo list | describe MODEL [MODEL ...]``: the supported models and their traced layers."""

from __future__ import annotations

import sys

from pipeline.errors import EXIT_BAD_INPUT, reporting_errors
from pipeline.models.zoo import FAMILIES, describe, family_models


def _list() -> str:
    lines = []
    for name, members in family_models().items():
        family = FAMILIES[name]
        lines.append(f"{name} ({len(members)} architectures; {family.description}; timm module {family.timm_module})")
        lines.extend(f"  {member}" for member in members)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"] and len(argv) == 1:
        return reporting_errors(lambda: print(_list()))
    if argv[:1] == ["describe"] and len(argv) > 1:
        return reporting_errors(lambda: print("\n\n".join(describe(name) for name in argv[1:])))
    print("usage: python -m pipeline.zoo list | describe MODEL [MODEL ...]", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
