"""``python -m pipeline.status store.root=DIR``: planned / done / failed per model and layer, from the store alone."""

from __future__ import annotations

import sys

from pipeline.errors import EXIT_BAD_INPUT, reporting_errors
from pipeline.store.store import Store
from pipeline.views.status import USAGE, render


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    roots = [a.partition("=")[2] for a in argv if a.startswith("store.root=")]
    if len(roots) != 1 or len(argv) != 1 or not roots[0]:
        print(USAGE, file=sys.stderr)
        return EXIT_BAD_INPUT
    return reporting_errors(lambda: print(render(Store(roots[0]))))


if __name__ == "__main__":
    sys.exit(main())
