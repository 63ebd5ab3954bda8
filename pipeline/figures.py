"""``python -m pipeline.figures store.root=DIR out=DIR``: paper-style figures from a store, as PNG and PDF."""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.views.figures import USAGE, write_figures


def main(argv: list[str]) -> None:
    settings = cli.parse_key_values(argv, USAGE, required=("store.root", "out"), optional={"model": "", "target": "mlp"})
    models = [name for name in settings["model"].split(",") if name] or None
    written = write_figures(settings["store.root"], settings["out"], models, settings["target"])
    print(f"figures: wrote {len(written)} files ({len(written) // 2} figures, PNG and PDF) to {settings['out']}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
