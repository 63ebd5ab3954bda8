"""A small store written directly with Store.writer(): no Ray, no models, a second to make.

Images are gratings whose frequency grows with the layer and whose colour
follows the feature, so a grid of them shows a visible early -> late progression.
``write_raw_store`` writes records the store's writer would refuse (crafted keys,
undecodable images) straight as a Parquet part and a tar shard; ``write_v1_store``
and ``write_v2_store`` write records as a store of record schema v1 (no measured
columns, no activation curve) or v2 (no activation curve) holds them.
Baselines and embeddings are made up (no model): noise below grey below the image,
and an embedding that follows the feature, so seeds of one feature agree.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.engine.descriptors import describe_png
from pipeline.store.layout import model_dir
from pipeline.store.schemas import (CURVE_COLUMN, EXAMPLES, MEASURED_COLUMNS, RECORD_SCHEMA, RECORD_SCHEMA_V1,
                                    RECORD_SCHEMA_V2, unit_key)
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


def records(models=MODELS, config_hash: str = "cfg0", seeds=(0,), size: int = IMAGE_SIZE) -> list[dict]:
    made = []
    for model, family, weights, layers, features, labels in models:
        for layer in layers:
            for feature in features:
                for seed in seeds:
                    unit = dict(model=model, weights=weights, target="mlp", objective="mean", layer=layer,
                                feature=feature, seed=seed, config_hash=config_hash)
                    png = grating_png(layer, feature, size)
                    activation = float(layer + feature / 10)
                    made.append(dict(
                        unit, key=unit_key(**unit), family=family,
                        config=json.dumps({"optim": {"lr": 0.1, "steps": 3}, "objective": "mean"}),
                        label=labels.get(feature), png=png,
                        activation=activation, activation_trace=[0.0, 0.5, float(layer)],
                        activation_curve=[activation / 4, activation / 2, activation],
                        steps=3, image_size=size, device="cpu", precision="fp32", duration_s=0.01,
                        code_version="test", timestamp=dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc),
                        **measured(png, activation, feature, seed),
                    ))
    return made


def measured(png: bytes, activation: float, feature: int = 0, seed: int = 0) -> dict:
    """A record's measured columns: its image's descriptors, and made-up baselines and embedding."""
    return dict(describe_png(png), activation_noise=activation / 4 - 0.5, activation_grey=activation / 2,
                embedding=[float(feature == i) + 0.1 * seed for i in range(8)])


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


# The columns each older record schema lacks.
_LACKED = {RECORD_SCHEMA_V1: {*MEASURED_COLUMNS, CURVE_COLUMN}, RECORD_SCHEMA_V2: {CURVE_COLUMN}}


def older_schema(schema_id: str) -> pa.Schema:
    """RECORD_SCHEMA as an older record schema (RECORD_SCHEMA_V1, RECORD_SCHEMA_V2) had it."""
    fields = [field for field in RECORD_SCHEMA if field.name not in _LACKED[schema_id]]
    return pa.schema(fields, metadata={"schema_id": schema_id})


def write_older_store(root, schema_id: str, models=MODELS, seeds=(0,), size: int = IMAGE_SIZE) -> list[dict]:
    """A store as vit-atlas wrote it with an older record schema; returns its records (without the columns that
    schema lacks). ``size=224``: images at the native size of the models, which can then measure them."""
    written = [{k: v for k, v in record.items() if k not in _LACKED[schema_id]}
               for record in records(models, seeds=seeds, size=size)]
    write_raw_store(root, written, older_schema(schema_id))
    return written


def write_v1_store(root, models=MODELS, seeds=(0,), size: int = IMAGE_SIZE) -> list[dict]:
    return write_older_store(root, RECORD_SCHEMA_V1, models, seeds, size)


def write_v2_store(root, models=MODELS, seeds=(0,), size: int = IMAGE_SIZE) -> list[dict]:
    return write_older_store(root, RECORD_SCHEMA_V2, models, seeds, size)


def write_raw_store(root, records: list[dict], schema: pa.Schema = RECORD_SCHEMA) -> None:
    """Commit ``records`` as the store would lay them out, without its validation: one Parquet part and
    one WebDataset shard per model (tar members named ``<key>.png`` / ``<key>.json``, whatever the key)."""
    by_model: dict[str, list[dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    (root / "webdataset").mkdir(parents=True, exist_ok=True)
    for model, rows in by_model.items():
        commit = uuid.uuid4().hex
        with tarfile.open(root / "webdataset" / f"shard-{commit}.tar", "w") as tar:
            for row in rows:
                fields = {k: v for k, v in row.items() if k != "png"}
                fields["timestamp"] = fields["timestamp"].isoformat()
                for name, data in ((f"{row['key']}.png", row["png"]), (f"{row['key']}.json",
                                                                        json.dumps(fields).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        part = root / "parquet" / model_dir(model) / f"part-{commit}.parquet"
        part.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), part)
