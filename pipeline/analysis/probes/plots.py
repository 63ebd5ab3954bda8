"""Matplotlib without a display: a probe's figure rendered to PNG bytes, which the store publishes."""

from __future__ import annotations

import io


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    return fig, list(axes[0]) if panels > 1 else axes[0][0]


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
