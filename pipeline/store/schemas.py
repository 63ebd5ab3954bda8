"""The shape of everything the store holds: one schema per table, all of them here.

A *unit* is one planned visualization: (model, weights, target, layer, feature,
seed, config). Its ``key`` is derived from those fields alone, so the same sweep
always plans the same keys and a re-run can subtract what the store holds.
A *record* is a finished unit: the unit's fields plus the image and provenance,
and (since record schema v2) what was measured on its final image: descriptors,
baseline activations and a pooled-feature embedding (docs/store.md defines them); since v3,
the activation curve, the un-augmented image's activation during the run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_ID = "vit-atlas/record/v3"  # what this version writes
RECORD_SCHEMA_V1 = "vit-atlas/record/v1"  # before the measured columns; its parts read with them null
RECORD_SCHEMA_V2 = "vit-atlas/record/v2"  # before the activation curve; its parts read it as null
# Record schema ids this version reads, oldest first; a part with any other id is refused.
READABLE_SCHEMA_IDS = (RECORD_SCHEMA_V1, RECORD_SCHEMA_V2, SCHEMA_ID)
# Parts without the measured columns: what `vit-atlas describe` measures and rewrites. A v2 part has them; the
# curve it lacks only a re-run of the optimization could record, so describe leaves it as it is.
UNMEASURED_SCHEMA_IDS = (RECORD_SCHEMA_V1,)

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

# The image's descriptors, in pipeline.engine.descriptors.DESCRIPTORS order (a test keeps the two equal;
# the store does not import the engine, which needs torch).
DESCRIPTOR_COLUMNS = ("spectral_centroid", "high_frequency_share", "edge_density", "rms_contrast",
                      "colourfulness", "png_bytes")
BASELINE_COLUMNS = ("activation_noise", "activation_grey")
EMBEDDING_COLUMN = "embedding"
CURVE_COLUMN = "activation_curve"
# Added by v2 and nullable for that reason alone: a v1 part reads them as null, but every v2 record has them.
MEASURED_FIELDS = (
    [pa.field(name, pa.float64()) for name in DESCRIPTOR_COLUMNS]
    + [
        pa.field("activation_noise", pa.float64()),  # the objective on the unit's uniform noise image
        pa.field("activation_grey", pa.float64()),  # the objective on a flat 0.5 grey image
        pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32())),  # patch-mean early-layer features of the image
    ]
)

RECORD_SCHEMA = pa.schema(
    UNIT_FIELDS
    + [
        pa.field("config", pa.string(), nullable=False),  # resolved optimizer config, JSON
        pa.field("label", pa.string()),  # what a planted feature was built to prefer; null otherwise
        pa.field("png", pa.binary(), nullable=False),  # final image, un-augmented, native size
        pa.field("activation", pa.float64(), nullable=False),  # objective on the final image, no augmentation
        # What the optimizer maximized during the run: the mean score of the augmented copies.
        pa.field("activation_trace", pa.list_(pa.float32()), nullable=False),
        # Since v3, the un-augmented image's activation during the run, its last value `activation`: nullable only
        # because older records lack it (a v1 part that describe rewrites included); every sweep writes it.
        pa.field(CURVE_COLUMN, pa.list_(pa.float32())),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("image_size", pa.int32(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("precision", pa.string(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    + MEASURED_FIELDS,
    metadata={"schema_id": SCHEMA_ID},
)
MEASURED_COLUMNS = tuple(field.name for field in MEASURED_FIELDS)

FAILURE_SCHEMA = pa.schema(
    UNIT_FIELDS
    + [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"schema_id": "vit-atlas/record/v1/failure"},  # unchanged by record v2 and v3
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")
# What unit_key makes, and all a store accepts: keys become file names (WebDataset members,
# atlas pages) and HTML attributes, so nothing but these characters may reach them.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_]+-[a-z_]+-l\d{3,}-f\d{5,}-s-?\d+-[0-9a-f]{12}")


def unit_key(model: str, weights: str, target: str, objective: str, layer: int, feature: int, seed: int,
             config_hash: str) -> str:
    """A unique, dot-free, human-scannable key (WebDataset splits keys at the first dot)."""
    return unit_keys(model, weights, target, objective, layer, [feature], seed, config_hash)[0]


def unit_keys(model: str, weights: str, target: str, objective: str, layer: int, features, seed: int,
              config_hash: str) -> list[str]:
    """``unit_key`` of each of ``features`` (one group's units): what they share is formatted once, which
    makes planning a million units several seconds faster."""
    before, after = f"{model}|{weights}|{target}|{objective}|{layer}|", f"|{seed}|{config_hash}"
    name = f"{_UNSAFE.sub('_', model)}-{target}-l{layer:03d}-f"
    sha256 = hashlib.sha256
    return [f"{name}{feature:05d}-s{seed}-{sha256(f'{before}{feature}{after}'.encode()).hexdigest()[:12]}"
            for feature in features]


@dataclass(frozen=True)
class TableSpec:
    """A named part table of a store: ``<root>/<name>/part-<part id>.parquet``, all of ``schema``."""

    name: str
    schema: pa.Schema


EXAMPLE_FIELDS = [
    pa.field("rank", pa.int32(), nullable=False),  # 0 = most activating
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("activation", pa.float64(), nullable=False),  # patch-mean activation (the sweep's objective)
    pa.field("thumbnail", pa.binary(), nullable=False),  # PNG of the model's crop
    pa.field("activation_map", pa.list_(pa.float32()), nullable=False),  # row-major over the patch grid
    pa.field("grid_rows", pa.int32(), nullable=False),
    pa.field("grid_cols", pa.int32(), nullable=False),
]

# Top natural images per visualization, under the visualization's key, for the atlas.
EXAMPLES = TableSpec("examples", pa.schema(
    [pa.field("key", pa.string(), nullable=False)] + EXAMPLE_FIELDS,
    metadata={"schema_id": "vit-atlas/examples/v1"}))

# One slice of images' top-k per unit (layer, feature, kind) of a model, merged into EXAMPLES when all slices
# are in. ``kind`` is null for an MLP channel (slices written before other kinds lack the column: the same),
# else the target, and for a directions unit the file's sha256 (pipeline.analysis.examples.UnitKind).
EXAMPLE_SLICES = TableSpec("examples-partial", pa.schema(
    [pa.field("layer", pa.int32(), nullable=False), pa.field("feature", pa.int32(), nullable=False),
     pa.field("kind", pa.string(), nullable=True)]
    + EXAMPLE_FIELDS,
    metadata={"schema_id": "vit-atlas/examples-partial/v1"}))

PROBE_RESULT_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),
    pa.field("condition", pa.string(), nullable=False),
    pa.field("param", pa.float64()),  # the swept value: block l, patch index, cut-off radius, layer
    pa.field("feature", pa.int32(), nullable=False),  # -1 where the measurement is not per feature
    pa.field("metric", pa.string(), nullable=False),
    pa.field("total", pa.float64(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
], metadata={"schema_id": "vit-atlas/probe-result/v1"})


def probe_results(probe: str) -> TableSpec:
    """A probe's sums per unit (one model x one slice of images), beside its report and plot."""
    return TableSpec(f"probes/{probe}", PROBE_RESULT_SCHEMA)

# `vit-atlas directions`: the token vectors of one (model, weights, layer, target, image set), one part per
# slice of images (a row per image: its pixels' sha256 and its tokens' vectors, row-major), for the fits, and
# the part `references`: the content-free images' (flat grey, uniform noise), the sha256 of their float32 pixels.
DIRECTION_TOKENS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("pixels_sha256", pa.string(), nullable=False),  # of the decoded RGB pixels, as read
    pa.field("tokens", pa.int32(), nullable=False),
    pa.field("vectors", pa.list_(pa.float32()), nullable=False),  # tokens x width
], metadata={"schema_id": "vit-atlas/direction-tokens/v1"})


def direction_tokens(gather_id: str) -> TableSpec:
    return TableSpec(f"directions/tokens-{gather_id}", DIRECTION_TOKENS_SCHEMA)


# One part per finished fit: where its matrix is and what made it (the provenance JSON beside the matrix).
DIRECTION_FITS = TableSpec("directions/fits", pa.schema([
    pa.field("fit_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),  # the matrix, a .safetensors encoder (v1 pca fits: .npy)
    pa.field("model", pa.string(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("target", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("n", pa.int32(), nullable=False),
    pa.field("provenance", pa.string(), nullable=False),  # JSON
], metadata={"schema_id": "vit-atlas/direction-fits/v1"}))
