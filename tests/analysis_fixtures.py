"""Helpers for the analysis tests: synthetic labelled images on disk, fake store records, config composing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.store.schemas import unit_key
from synthetic_store import measured


def compose(config_name: str, *overrides: str):
    """The typed config (pipeline.config) the command would hand over, from override strings."""
    from pipeline import cli

    return cli.load(config_name, *overrides)


def save_image(path: Path, array: np.ndarray) -> None:
    """``array`` (H, W, 3) float in [0, 1], saved losslessly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def visualization_record(model: str, weights_id: str, weights: str, layer: int, feature: int,
                         objective: str = "mean") -> dict:
    """A store record as a sweep would write it (the image itself does not matter to the readers here)."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    fields = dict(model=model, weights=weights_id, target="mlp", objective=objective, layer=layer, feature=feature,
                  seed=0, config_hash="c0")
    return dict(fields, key=unit_key(**fields), family="deit",
                config=json.dumps({"weights": weights, "weights_id": weights_id}), label=None, png=buffer.getvalue(),
                activation=1.0, activation_trace=[1.0], activation_curve=[0.5, 1.0], steps=1, image_size=224,
                device="cpu", precision="fp32", duration_s=0.0, code_version="test",
                timestamp=dt.datetime.now(dt.timezone.utc), **measured(buffer.getvalue(), 1.0, feature))
