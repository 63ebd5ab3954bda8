"""``python -m pipeline.probes``: plan a probe over models and images, run it on Ray, report and plot.

    python -m pipeline.probes experiment=probe_tokens images.path=/data/imagenet/val
    python -m pipeline.probes experiment=probe_fgbg images.path=/data/imagenet/train images.boxes=/data/boxes
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline import config
from pipeline.analysis.probes.run import run_probes
from pipeline.errors import exit_on_failure

config.register()


@hydra.main(version_base=None, config_path="../conf", config_name="probes")
def main(cfg: DictConfig) -> None:
    exit_on_failure(lambda: run_probes(cfg))


if __name__ == "__main__":
    main()
