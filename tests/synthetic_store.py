"""A small store written directly with Store.writer(): no Ray, no models, a second to make.

Images are gratings whose frequency grows with the layer and whose colour
follows the feature, so a grid of them shows a visible early -> late progression.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.store.schemas import EXAMPLES, unit_key
from pipeline.store.store import Store

DEIT = "deit_tiny_patch16_224"
CLIP = "vit_base_patch32_clip_224.openai"  # a dotted name: model pages must get a safe file name
IMAGE_SIZE = 32
# (model, family, weights, layers, features, labels by feature)
MODELS = (
    (DEIT, "deit", "random-0", range(4), range(4), {}),
    (DEIT, "deit", "planted-v1-0", [1], range(2), {0: "planted: red", 1: "planted: grating 45°"}),
    (CLIP, "clip", "pretrained-openai", range(2), range(3), {}),
)
RECORD_COUNT = sum(len(layers) * len(features) for _, _, _, layers, features, _ in MODELS)


def grating_png(layer: int, feature: int, size: int = IMAGE_SIZE) -> bytes:
    y, x = np.mgrid[0:size, 0:size] / size
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (layer + 1) * (x + feature * y))
    colour = np.array([(feature * 70) % 256, 120, 255 - (feature * 50) % 256]) / 255
    pixels = (wave[..., None] * colour * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def records(models=MODELS, config_hash: str = "cfg0") -> list[dict]:
    made = []
    for model, family, weights, layers, features, labels in models:
        for layer in layers:
            for feature in features:
                unit = dict(model=model, weights=weights, target="mlp", objective="mean", layer=layer,
                            feature=feature, seed=0, config_hash=config_hash)
                made.append(dict(
                    unit, key=unit_key(**unit), family=family,
                    config=json.dumps({"optim": {"lr": 0.1, "steps": 3}, "objective": "mean"}),
                    label=labels.get(feature), png=grating_png(layer, feature),
                    activation=float(layer + feature / 10), activation_trace=[0.0, 0.5, float(layer)],
                    steps=3, image_size=IMAGE_SIZE, device="cpu", precision="fp32", duration_s=0.01,
                    code_version="test", timestamp=dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc),
                ))
    return made


def write_store(root, models=MODELS, config_hash: str = "cfg0") -> list[dict]:
    written = records(models, config_hash)
    with Store(str(root)).writer(commit_every=len(written) + 1) as writer:
        for record in written:
            writer.add(record)
    return written


def write_examples(root, keys: list[str], per_key: int = 3, grid: tuple[int, int] = (2, 2)) -> pa.Table:
    """The dataset-examples table the atlas shows: top natural images per key with activation maps."""
    rows = []
    for key in keys:
        for rank in range(per_key):
            buffer = io.BytesIO()
            Image.new("RGB", (48, 48), (40 * rank, 160, 90)).save(buffer, format="PNG")
            rows.append(dict(key=key, rank=rank, image_id=f"val_{rank:05d}.JPEG", activation=3.0 - rank,
                             thumbnail=buffer.getvalue(),
                             activation_map=[float(i == rank) for i in range(grid[0] * grid[1])],
                             grid_rows=grid[0], grid_cols=grid[1]))
    table = pa.Table.from_pylist(rows, schema=EXAMPLES.schema)
    Store(str(root)).table(EXAMPLES).write("0", table)
    return table
