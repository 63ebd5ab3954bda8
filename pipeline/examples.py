"""``vit-atlas examples`` (``python -m pipeline.examples``): the dataset images that most excite each
visualized feature.

    vit-atlas examples store.root=DIR images.path=PATH [k=9] [images.limit=N] [cluster=ray]
"""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> int:
    from pipeline.analysis.examples import run_examples

    return run_examples(cfg)


COMMAND = cli.Command("examples", _run, examples=(
    "vit-atlas examples store.root=outputs/store images.path=/data/imagenet/val k=9",
    "vit-atlas examples store.root=outputs/store images.path='/data/shards/val-{000..063}.tar' images.limit=5000",
    "vit-atlas examples store.root=s3://bucket/atlas images.path=/data/imagenet/val cluster=ray",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
