"""The WebDataset view of the records: one sample per record, ``<key>.png`` and ``<key>.json``."""

from __future__ import annotations

import json

import webdataset


def sample_of(fields: dict) -> dict:
    """A record's sample: its image, and every other column as JSON (as Parquet holds them)."""
    fields = dict(fields)
    png = fields.pop("png")
    fields["timestamp"] = fields["timestamp"].isoformat()
    return {"__key__": fields["key"], "png": png, "json": json.dumps(fields).encode()}


def write_shard(out, samples: list[dict]) -> None:
    """Write samples as one tar into the binary file object ``out``."""
    with webdataset.TarWriter(out, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
