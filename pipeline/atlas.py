"""``vit-atlas atlas store.root=DIR out=SITE_DIR`` (``python -m pipeline.atlas``): write (or bring up to date)
a store's atlas site."""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> None:
    from pipeline.views.atlas import build_site
    from pipeline.views.pages import count as _count

    report = build_site(cfg.store.root, cfg.out)
    broken = len(report.unreadable)
    unreadable = (f"; {_count(broken, 'image')} unreadable, shown as {'a placeholder' if broken == 1 else 'placeholders'}"
                  " (see the warnings)")
    print(f"atlas: {_count(report.records, 'image')} of {_count(report.models, 'model')}; wrote "
          f"{report.pages_written} new feature pages, kept {report.pages_kept}"
          f"{unreadable if report.unreadable else ''}; open {report.index.resolve().as_uri()}")


COMMAND = cli.Command("atlas", _run, examples=(
    "vit-atlas atlas store.root=outputs/store out=site      # then open site/index.html",
    "vit-atlas atlas store.root=s3://bucket/atlas out=/srv/atlas",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
