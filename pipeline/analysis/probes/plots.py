"""Matplotlib without a display: figures written as PNG files beside the probe's results."""

from __future__ import annotations

import os


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    return fig, list(axes[0]) if panels > 1 else axes[0][0]


def save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
