"""The shape of what flows from the planner and the workers into the store.

A *unit* is one planned visualization: (model, weights, target, layer, feature,
seed, config). Its ``key`` is derived from those fields alone, so the same sweep
always plans the same keys and a re-run can subtract what the store holds.
A *record* is a finished unit: the unit's fields plus the image and provenance.
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

SCHEMA_ID = "vit-atlas/record/v1"

UNIT_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("family", pa.string(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),  # random-<seed> | pretrained-<tag> | sha256-<hex> | planted-<version>
    pa.field("target", pa.string(), nullable=False),  # mlp | keys | queries | values | attn_out
    pa.field("objective", pa.string(), nullable=False),  # mean | position-<row>-<col>
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("seed", pa.int32(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
]

UNIT_SCHEMA = pa.schema(UNIT_FIELDS)

RECORD_SCHEMA = pa.schema(
    UNIT_FIELDS
    + [
        pa.field("config", pa.string(), nullable=False),  # resolved optimizer config, JSON
        pa.field("label", pa.string()),  # what a planted feature was built to prefer; null otherwise
        pa.field("png", pa.binary(), nullable=False),  # final image, un-augmented, native size
        pa.field("activation", pa.float64(), nullable=False),  # objective on the final image, no augmentation
        pa.field("activation_trace", pa.list_(pa.float32()), nullable=False),  # objective during the run
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("image_size", pa.int32(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("precision", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"schema_id": SCHEMA_ID},
)

FAILURE_SCHEMA = pa.schema(
    UNIT_FIELDS
    + [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"schema_id": SCHEMA_ID + "/failure"},
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def unit_key(model: str, weights: str, target: str, objective: str, layer: int, feature: int, seed: int,
             config_hash: str) -> str:
    """A unique, dot-free, human-scannable key (WebDataset splits keys at the first dot)."""
    identity = "|".join(map(str, (model, weights, target, objective, layer, feature, seed, config_hash)))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', model)}-{target}-l{layer:03d}-f{feature:05d}-s{seed}-{digest}"
