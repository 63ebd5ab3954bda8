"""``vit-atlas status store.root=DIR`` (``python -m pipeline.status``): planned / done / failed per model and
layer, from the store alone."""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.errors import EXIT_BAD_INPUT


def _run(cfg) -> int:
    from pipeline.store.store import Store
    from pipeline.views.status import render, verification

    store = Store(cfg.store.root)
    store.check_readable()
    store.recover()
    if cfg.verify:
        text, sound = verification(store, cfg.repair)
        print(text)
        if not sound:
            return EXIT_BAD_INPUT
    print(render(store))
    return 0


COMMAND = cli.Command("status", _run, examples=(
    "vit-atlas status store.root=outputs/store",
    "vit-atlas status store.root=outputs/store verify=true      # check every record's checksums too",
    "vit-atlas status store.root=s3://bucket/atlas verify=true repair=true",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
