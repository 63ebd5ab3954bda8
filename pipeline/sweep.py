"""``vit-atlas sweep`` (``python -m pipeline.sweep``): plan a sweep, subtract what the store holds, run the rest on Ray.

    vit-atlas sweep experiment=demo
    vit-atlas sweep sweep.models=[deit_tiny_patch16_224] sweep.layers=[1] sweep.features=[5,6] \
        sweep.seeds=[0] model.weights=random optim.steps=150 store.root=/some/dir
    vit-atlas sweep -m optim.tv=0.1,1.0 experiment=smoke      # one sweep per value, into one store
"""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> int:
    from pipeline.execution.driver import run_sweep

    return run_sweep(cfg)


COMMAND = cli.Command("sweep", _run, examples=(
    "vit-atlas sweep experiment=demo",
    "vit-atlas sweep sweep.models=[deit_tiny_patch16_224] sweep.layers=[1] sweep.features=[5,6] "
    "model.weights=random optim.steps=150 store.root=/some/dir",
    "vit-atlas sweep -m optim.tv=0.1,1.0 experiment=smoke store.root=/tmp/tv   # one sweep per value",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
