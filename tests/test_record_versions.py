"""Record schema versions: a v1 store still reads (measured columns null) and says so, a v2 store reads with no
activation curve; reliability of seeds."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import cli
from pipeline.store.errors import UnknownSchemaError
from pipeline.store.schemas import CURVE_COLUMN, MEASURED_COLUMNS, RECORD_SCHEMA_V1, RECORD_SCHEMA_V2, SCHEMA_ID
from pipeline.store.store import Store
from pipeline.views.readers import open_store
from synthetic_store import (DEIT, MODELS, RECORD_COUNT, records, write_raw_store, write_store, write_v1_store,
                             write_v2_store)


def test_a_v1_store_reads_with_null_measurements_and_reports_its_version(tmp_path, capsys):
    written = write_v1_store(tmp_path)
    atlas = open_store(str(tmp_path))
    table = atlas.table()
    assert table.num_rows == RECORD_COUNT and set(MEASURED_COLUMNS) <= set(table.column_names)
    assert all(table[name].null_count == RECORD_COUNT for name in MEASURED_COLUMNS)
    by_key = {row["key"]: row for row in table.to_pylist()}
    assert all(by_key[r["key"]]["activation"] == r["activation"] for r in written)
    assert set(atlas.versions().values()) == {RECORD_SCHEMA_V1} and len(atlas.versions()) == 2  # a part per model
    assert atlas.reliability().num_rows == 0  # no embeddings: nothing to compare
    assert atlas.measurements()["spectral_centroid"].null_count == RECORD_COUNT

    assert cli.main(["status", f"store.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"record schema: 2 parts {RECORD_SCHEMA_V1}; `vit-atlas describe store.root={tmp_path}`" in out


def test_a_v2_store_reads_without_a_curve_and_describe_leaves_it_as_it_is(tmp_path, capsys):
    """v2 records have their measurements but no activation curve, which only the optimization records: they
    read with it null (tables and samples alike), beside v3 records that have it, and neither status nor
    describe offers to fill it."""
    old = [m for m in MODELS if m[2] == "random-0"]
    written = write_v2_store(tmp_path, old)
    write_store(tmp_path, [m for m in MODELS if m[2] != "random-0"])
    atlas = open_store(str(tmp_path))
    assert sorted(atlas.versions().values()) == [RECORD_SCHEMA_V2, SCHEMA_ID, SCHEMA_ID]
    rows = atlas.table(columns=["key", "weights", CURVE_COLUMN, "edge_density"]).to_pylist()
    assert {row["key"] for row in rows if row[CURVE_COLUMN] is None} == {r["key"] for r in written}
    assert all(row["edge_density"] is not None for row in rows)
    assert all(len(row[CURVE_COLUMN]) == 3 for row in rows if row["weights"] != "random-0")
    curves = {s["metadata"]["weights"]: s["metadata"][CURVE_COLUMN] for s in atlas.torch_samples(layer=1)}
    assert curves["random-0"] is None and len(curves["planted-v1-0"]) == 3

    assert cli.main(["status", f"store.root={tmp_path}"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"1 part {RECORD_SCHEMA_V2}, 2 parts {SCHEMA_ID}")
    assert cli.main(["describe", f"store.root={tmp_path}", "device=cpu"]) == 0
    assert f"every part of {tmp_path} is measured already; nothing to do" in capsys.readouterr().out
    assert sorted(open_store(str(tmp_path)).versions().values()) == [RECORD_SCHEMA_V2, SCHEMA_ID, SCHEMA_ID]


def test_a_store_of_both_versions_reads_both_and_still_refuses_a_foreign_part(tmp_path):
    old = [m for m in MODELS if m[2] == "random-0"]
    write_v1_store(tmp_path, old)
    write_store(tmp_path, [m for m in MODELS if m[2] != "random-0"])
    atlas = open_store(str(tmp_path))
    assert sorted(atlas.versions().values()) == [RECORD_SCHEMA_V1, SCHEMA_ID, SCHEMA_ID]  # deit v1, deit and clip v2
    table = atlas.table(columns=["weights", "edge_density"])
    nulls = {row["weights"] for row in table.to_pylist() if row["edge_density"] is None}
    assert nulls == {"random-0"} and table.num_rows == RECORD_COUNT

    foreign = atlas.table(with_images=True, model=DEIT).replace_schema_metadata({"schema_id": "someone/else/v1"})
    pq.write_table(foreign, tmp_path / "parquet" / f"model={DEIT}" / "part-foreign.parquet")
    with pytest.raises(UnknownSchemaError, match="'someone/else/v1'"):
        open_store(str(tmp_path)).versions()
    with pytest.raises(UnknownSchemaError, match="'someone/else/v1'"):  # read first, checked after the scan
        Store(str(tmp_path)).committed_keys()
    # A foreign part whose columns do not even read as records: still named for its schema id, not as damaged.
    pq.write_table(pa.table({"key": [1]}, metadata={"schema_id": "someone/else/v1"}),
                   tmp_path / "parquet" / f"model={DEIT}" / "part-foreign.parquet")
    with pytest.raises(UnknownSchemaError, match="'someone/else/v1'"):
        Store(str(tmp_path)).status()


def _embedding(visualizer, image: torch.Tensor) -> list[float]:
    return visualizer.pooled_features(image[None], 1)[0].tolist()


def test_reliability_is_high_for_identical_seeds_images_and_lower_for_unrelated_ones(tmp_path):
    from pipeline.engine.visualizer import Visualizer
    from pipeline.models import weights

    visualizer = Visualizer(DEIT, weights.resolve(DEIT, "planted"), torch.device("cpu"))
    grid = torch.linspace(0, 1, 224)

    def grating(cycles: int, colour=(1.0, 1.0, 1.0)) -> torch.Tensor:
        wave = 0.5 + 0.5 * torch.sin(2 * np.pi * cycles * grid)[None, :].expand(224, 224)
        return torch.stack([wave * c for c in colour])

    def noise(seed: int) -> torch.Tensor:
        return torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(seed))

    # (feature, seed) -> image. Features 0 and 1 are the units under test; 2..7 stand for the rest of
    # the model's visualizations, on which embeddings are centred.
    images = {(0, 0): grating(8), (0, 1): grating(8), (1, 0): grating(8), (1, 1): noise(0)}
    for feature in range(2, 8):
        images[(feature, 0)] = grating(feature, (1.0, feature / 8, 1 - feature / 8))
        images[(feature, 1)] = noise(feature)
    made = records([(DEIT, "deit", "planted-v1-0", [1], range(8), {})], seeds=(0, 1))
    for record in made:
        record["embedding"] = _embedding(visualizer, images[(record["feature"], record["seed"])])
    write_raw_store(tmp_path, made)
    rows = {row["feature"]: row for row in open_store(str(tmp_path)).reliability().to_pylist()}
    assert len(rows) == 8 and rows[0]["seeds"] == rows[1]["seeds"] == 2
    assert rows[0]["reliability"] == pytest.approx(1.0, abs=1e-6)
    # uncentred, a grating and noise score 0.999 at this layer; centred, unrelated seeds fall well below 1
    assert rows[1]["reliability"] < 0.9
    assert np.mean([rows[f]["reliability"] for f in range(2, 8)]) < 0.9
    only = open_store(str(tmp_path)).reliability(feature=1).to_pylist()  # filters pick units, not the centre
    assert [row["reliability"] for row in only] == [rows[1]["reliability"]]


def test_reliability_holds_embeddings_as_arrays_not_python_floats(tmp_path, monkeypatch):
    """A model's embeddings are hundreds of floats per record: as Python lists about 25 KB each, which an
    atlas of 100,000 records held at once (2.5 GB). Read as arrays they cost only their matrix, and the
    float64 copy of one batch of units' seeds (a bounded working set, 75 MB at ViT-B's batch of 1,024
    units): measured here with batches of 8 units, so the matrix is what counts."""
    import tracemalloc

    from pipeline.views import readers

    monkeypatch.setattr(readers, "RELIABILITY_UNITS", 8)

    width, features = 768, 150
    made = records([(DEIT, "deit", "random-0", [1], range(features), {})], seeds=(0, 1))
    rng = np.random.default_rng(0)
    for record in made:
        record["embedding"] = rng.standard_normal(width).astype(np.float32).tolist()
    write_raw_store(tmp_path, made)
    atlas = open_store(str(tmp_path))
    tracemalloc.start()
    try:
        reliable = atlas.reliability()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reliable.num_rows == features and reliable["reliability"].null_count == 0
    as_python_floats = len(made) * width * 32  # a float object and its list slot
    assert peak < as_python_floats / 4, f"{peak / 2**20:.1f} MiB traced"


def test_the_store_doc_holds_the_current_descriptor_table_and_every_record_column():
    from pathlib import Path

    from pipeline.engine.descriptors import descriptor_table
    from pipeline.store.schemas import RECORD_SCHEMA

    doc = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()
    assert descriptor_table() in doc
    assert SCHEMA_ID in doc and RECORD_SCHEMA_V1 in doc and RECORD_SCHEMA_V2 in doc
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert set(RECORD_SCHEMA.names) <= documented
