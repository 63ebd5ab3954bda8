"""``python -m pipeline.atlas store.root=DIR out=SITE_DIR``: write (or bring up to date) a store's atlas site."""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.views.atlas import USAGE, _count, build_site


def main(argv: list[str]) -> None:
    settings = cli.parse_key_values(argv, USAGE, required=("store.root", "out"), optional={})
    report = build_site(settings["store.root"], settings["out"])
    broken = len(report.unreadable)
    unreadable = (f"; {_count(broken, 'image')} unreadable, shown as {'a placeholder' if broken == 1 else 'placeholders'}"
                  " (see the warnings)")
    print(f"atlas: {_count(report.records, 'image')} of {_count(report.models, 'model')}; wrote "
          f"{report.pages_written} new feature pages, kept {report.pages_kept}"
          f"{unreadable if report.unreadable else ''}; open {report.index.resolve().as_uri()}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
