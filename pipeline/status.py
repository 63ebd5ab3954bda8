"""``python -m pipeline.status store.root=DIR``: planned / done / failed per model and layer, from the store alone."""

from __future__ import annotations

import sys

from pipeline.errors import EXIT_BAD_INPUT, reporting_errors
from pipeline.store.store import Store
from pipeline.views.status import render, verification

USAGE = "usage: python -m pipeline.status store.root=DIR [verify=true [repair=true]]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = dict(a.partition("=")[::2] for a in argv)
    if set(settings) - {"store.root", "verify", "repair"} or not settings.get("store.root"):
        print(USAGE, file=sys.stderr)
        return EXIT_BAD_INPUT

    def status() -> int:
        store = Store(settings["store.root"])
        store.recover()
        if settings.get("verify") == "true":
            text, sound = verification(store, settings.get("repair") == "true")
            print(text)
            if not sound:
                return EXIT_BAD_INPUT
        print(render(store))
        return 0

    return reporting_errors(status)


if __name__ == "__main__":
    sys.exit(main())
