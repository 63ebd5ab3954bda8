"""``vit-atlas describe store.root=DIR`` (``python -m pipeline.describe``): measure an existing store's records
(descriptors, baselines, embedding) without re-optimizing, rewriting its record schema v1 parts as v2."""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> int:
    from pipeline.analysis.describe import run_describe

    return run_describe(cfg)


COMMAND = cli.Command("describe", _run, examples=(
    "vit-atlas describe store.root=outputs/store",
    "vit-atlas describe store.root=s3://bucket/atlas device=cuda",
    "vit-atlas describe store.root=outputs/store weights=/data/ckpts     # a checkpoint that has moved",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
