"""``python -m pipeline.examples``: the dataset images that most excite each visualized feature.

    python -m pipeline.examples store.root=DIR images=PATH [k=9] [limit=N] [cluster=ray]
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline import config
from pipeline.analysis.examples import run_examples
from pipeline.errors import exit_on_failure

config.register()


@hydra.main(version_base=None, config_path="../conf", config_name="examples")
def main(cfg: DictConfig) -> None:
    exit_on_failure(lambda: run_examples(cfg))


if __name__ == "__main__":
    main()
