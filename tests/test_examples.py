"""Dataset examples: planted features find the images built to drive them; resumable; clear errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from pipeline.models import planted
from pipeline.errors import PipelineError
from pipeline.analysis.examples import run_examples
from pipeline.store.schemas import EXAMPLES, unit_key
from pipeline.store.store import Store
from tests.analysis_fixtures import compose, save_image, visualization_record

MODEL = "deit_tiny_patch16_224"
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture
def image_folder(tmp_path):
    """One uniform image per planted colour plus grey noise images, two classes (labels do not matter here)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i, colour in enumerate(COLOURS):
        save_image(root / "a" / f"{colour}.png", np.broadcast_to(planted.COLOURS[colour], (240, 260, 3)))
    for i in range(4):
        save_image(root / "b" / f"noise{i}.png", 0.5 + 0.1 * rng.standard_normal((240, 260, 3)))
    return root


def _store_with_visualizations(root) -> tuple[Store, dict[int, str]]:
    store = Store(str(root))
    records = {f: visualization_record(MODEL, "planted-v1-0", "planted", planted.PLANTED_LAYER, f) for f in range(3)}
    position = visualization_record(MODEL, "planted-v1-0", "planted", planted.PLANTED_LAYER, 0, "position-1-1")
    direction = visualization_record(MODEL, "planted-v1-0", "planted", planted.PLANTED_LAYER, 1)
    direction.update(config_hash="c1", config=json.dumps({**json.loads(direction["config"]), "directions": {
        "path": "/rows.npy", "sha256": "sha256-0", "format": "npy"}}))
    direction["key"] = unit_key(MODEL, "planted-v1-0", "mlp", "mean", planted.PLANTED_LAYER, 1, 0, "c1")
    with store.writer() as writer:
        for record in [*records.values(), position, direction]:
            writer.add(record)
    return store, {f: r["key"] for f, r in records.items()}


def test_planted_features_rank_their_colour_first_and_rerun_skips(tmp_path, image_folder, ray_local, capsys):
    store, keys = _store_with_visualizations(tmp_path / "store")
    cfg = compose("examples", f"store.root={store.root}", f"images.path={image_folder}", "k=3", "slice_size=3",
                  "batch_size=4", "cluster.workers=2", "progress.bar=false")
    assert run_examples(cfg) == 0

    table = ds.dataset(f"{store.root}/examples", format="parquet").to_table()
    assert table.schema.equals(EXAMPLES.schema, check_metadata=False)
    # The position-objective record gets none, nor a direction's (its feature is a row, not channel 1).
    assert set(table["key"].to_pylist()) == set(keys.values())
    rows = table.to_pylist()
    for feature, colour in enumerate(COLOURS[:3]):
        ranked = sorted((r for r in rows if r["key"] == keys[feature]), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranked] == [0, 1, 2]
        assert ranked[0]["image_id"] == f"a/{colour}.png"
        assert ranked[0]["activation"] > ranked[1]["activation"]
        assert (ranked[0]["grid_rows"], ranked[0]["grid_cols"]) == (14, 14)
        assert len(ranked[0]["activation_map"]) == 196
        # a uniform image drives every patch alike; the map's mean is the ranked activation
        assert np.mean(ranked[0]["activation_map"]) == pytest.approx(ranked[0]["activation"], rel=1e-4)
        thumb = Image.open(io.BytesIO(ranked[0]["thumbnail"]))
        assert thumb.size == (64, 64)
        assert np.asarray(thumb)[..., "rgb".index(colour[0])].mean() > 200
    assert not list((tmp_path / "store" / "examples-partial").glob("part-*"))  # merged and removed

    capsys.readouterr()
    assert run_examples(cfg) == 0
    assert "0 units to run" in capsys.readouterr().out
    assert ds.dataset(f"{store.root}/examples", format="parquet").count_rows() == table.num_rows


def test_bad_images_path_is_reported_before_any_work(tmp_path):
    store, _ = _store_with_visualizations(tmp_path / "store")
    cfg = compose("examples", f"store.root={store.root}", f"images.path={tmp_path / 'missing'}")
    with pytest.raises(PipelineError, match="ImageFolder"):
        run_examples(cfg)
    assert not (tmp_path / "store" / "examples").exists()
