"""``python -m pipeline.sweep``: plan a sweep, subtract what the store holds, run the rest on Ray.

    python -m pipeline.sweep experiment=demo
    python -m pipeline.sweep sweep.models=[deit_tiny_patch16_224] sweep.layers=[1] sweep.features=[5,6] \
        sweep.seeds=[0] model.weights=random optim.steps=150 store.root=/some/dir
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline import config
from pipeline.errors import exit_on_failure
from pipeline.execution.driver import run_sweep

config.register()


@hydra.main(version_base=None, config_path="../conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    exit_on_failure(lambda: run_sweep(cfg))


if __name__ == "__main__":
    main()
