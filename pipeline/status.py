"""``vit-atlas status store.root=DIR`` (``python -m pipeline.status``): planned / done / failed per model and
layer, from the store alone."""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> None:
    from pipeline.store.store import Store
    from pipeline.views.status import render

    print(render(Store(cfg.store.root)))


COMMAND = cli.Command("status", _run, examples=(
    "vit-atlas status store.root=outputs/store",
    "vit-atlas status store.root=s3://bucket/atlas",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
