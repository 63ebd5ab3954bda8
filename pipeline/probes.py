"""``vit-atlas probes`` (``python -m pipeline.probes``): plan a probe over models and images, run it on Ray,
report and plot.

    vit-atlas probes experiment=probe_tokens images.path=/data/imagenet/val
    vit-atlas probes experiment=probe_fgbg images.path=/data/imagenet/train images.boxes=/data/boxes
"""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> int:
    from pipeline.analysis.probes.run import run_probes

    return run_probes(cfg)


COMMAND = cli.Command("probes", _run, examples=(
    "vit-atlas probes experiment=probe_tokens images.path=/data/imagenet/val",
    "vit-atlas probes experiment=probe_fgbg images.path=/data/imagenet/train "
    "images.boxes=/data/imagenet/bboxes/train",
    "vit-atlas probes probe.name=frequency probe.models=[deit_tiny_patch16_224] probe.weights=random "
    "images.path=/data/small images.limit=500",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
