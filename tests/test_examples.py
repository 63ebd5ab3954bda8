"""Dataset examples: planted features find the images built to drive them, for every unit kind (channels of
any target, directions); resumable, also after kill -9; clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

from pipeline.analysis import images as images_lib
from pipeline.models import planted
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.errors import PipelineError
from pipeline.analysis.examples import plan_batches, run_examples
from pipeline.store.schemas import EXAMPLE_SLICES, EXAMPLES, unit_key
from pipeline.store.store import Store
from tests.analysis_fixtures import compose, save_image, visualization_record

MODEL = "deit_tiny_patch16_224"
COLOURS = ["red", "green", "blue", "yellow"]
RESIDUAL_FEATURE = 5
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


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


def _write_rows(path: Path, rows: np.ndarray) -> dict[str, str]:
    """The rows as a .npy directions file, and what a record's config says of it."""
    np.save(path, rows.astype(np.float32))
    return {"path": str(path), "sha256": weights_lib.bytes_id(path.read_bytes()), "format": "npy"}


def _record(target: str, layer: int, feature: int, directions: dict | None = None, objective: str = "mean") -> dict:
    """A record of a planted-weights deit_tiny unit of ``target`` (with ``directions``: a row of that file)."""
    record = visualization_record(MODEL, "planted-v1-0", "planted", layer, feature, objective)
    config_hash = "c1" if directions else "c0"
    config = {**json.loads(record["config"]), **({"directions": directions} if directions else {})}
    record.update(target=target, config_hash=config_hash, config=json.dumps(config),
                  key=unit_key(MODEL, "planted-v1-0", target, objective, layer, feature, 0, config_hash))
    return record


def _write(store: Store, records: list[dict]) -> None:
    with store.writer() as writer:
        for record in records:
            writer.add(record)


def _store_with_visualizations(root, directions: dict) -> tuple[Store, dict[int, str]]:
    """MLP channels 0..2 of the planted layer, one of them also at objective position, direction 0 of
    ``directions`` and residual channel RESIDUAL_FEATURE of that layer."""
    store = Store(str(root))
    records = {f: visualization_record(MODEL, "planted-v1-0", "planted", planted.PLANTED_LAYER, f) for f in range(3)}
    position = visualization_record(MODEL, "planted-v1-0", "planted", planted.PLANTED_LAYER, 0, "position-1-1")
    direction = _record("mlp", planted.PLANTED_LAYER, 0, directions)
    residual = _record("residual", planted.PLANTED_LAYER, RESIDUAL_FEATURE)
    _write(store, [*records.values(), position, direction, residual])
    return store, {**{f: r["key"] for f, r in records.items()}, "direction": direction["key"],
                   "residual": residual["key"]}


def _one_hot_rows(folder: Path, channel: int) -> dict[str, str]:
    """Two directions in the planted layer's MLP space; row 0 is one-hot at ``channel``."""
    width = zoo.layout(MODEL).site(planted.PLANTED_LAYER, "mlp").features
    rows = np.zeros((2, width))
    rows[0, channel] = 1.0
    rows[1] = np.random.default_rng(1).standard_normal(width)
    return _write_rows(folder / "rows.npy", rows)


def _ranked(rows: list[dict], key: str) -> list[dict]:
    return sorted((r for r in rows if r["key"] == key), key=lambda r: r["rank"])


def _residual_examples(image_folder: Path, layer: int, feature: int, k: int) -> list[tuple[str, float, np.ndarray]]:
    """The top-k images by residual channel ``feature`` of block ``layer``, computed directly: timm's block
    output read by a hook, the patch tokens' mean."""
    choice = weights_lib.resolve(MODEL, "planted")
    model = weights_lib.load(MODEL, choice, torch.device("cpu"))
    preprocess = images_lib.Preprocess.for_model(model, zoo.layout(MODEL).input_size)
    outputs = []
    handle = model.blocks[layer].register_forward_hook(lambda _m, _i, out: outputs.append(out))
    scored = []
    with torch.no_grad():
        for image in images_lib.open_images(str(image_folder)).batches(1):
            outputs.clear()
            model(preprocess.normalize(preprocess.crop(image[0].pixels)[None]))
            patches = outputs[0][0, 1:, feature].numpy()  # deit_tiny: one CLS token first
            scored.append((image[0].ref.image_id, float(patches.mean()), patches))
    handle.remove()
    return sorted(scored, key=lambda s: (-s[1], s[0]))[:k]


def test_planted_features_rank_their_colour_first_and_every_unit_kind_gets_examples(tmp_path, image_folder, ray_local,
                                                                                  capsys):
    store, keys = _store_with_visualizations(tmp_path / "store", _one_hot_rows(tmp_path, channel=1))
    cfg = compose("examples", f"store.root={store.root}", f"images.path={image_folder}", "k=3", "slice_size=3",
                  "batch_size=4", "cluster.workers=2", "progress.bar=false")
    assert run_examples(cfg) == 0

    table = ds.dataset(f"{store.root}/examples", format="parquet").to_table()
    assert table.schema.equals(EXAMPLES.schema, check_metadata=False)
    # The position-objective record gets none; the direction and the residual channel do.
    assert set(table["key"].to_pylist()) == set(keys.values())
    rows = table.to_pylist()
    for feature, colour in enumerate(COLOURS[:3]):
        ranked = _ranked(rows, keys[feature])
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

    # Direction 0 is one-hot at channel 1: the same images, activations and maps as that channel.
    direction, channel = _ranked(rows, keys["direction"]), _ranked(rows, keys[1])
    assert [r["image_id"] for r in direction] == [r["image_id"] for r in channel]
    for ours, theirs in zip(direction, channel):
        assert ours["activation"] == pytest.approx(theirs["activation"], rel=1e-5)
        np.testing.assert_allclose(ours["activation_map"], theirs["activation_map"], rtol=1e-5, atol=1e-6)

    expected = _residual_examples(image_folder, planted.PLANTED_LAYER, RESIDUAL_FEATURE, k=3)
    residual = _ranked(rows, keys["residual"])
    assert [r["image_id"] for r in residual] == [image_id for image_id, _, _ in expected]
    for ours, (_, activation, patches) in zip(residual, expected):
        assert ours["activation"] == pytest.approx(activation, rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(ours["activation_map"], patches, rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "store" / "examples-partial").glob("part-*"))  # merged and removed

    capsys.readouterr()
    assert run_examples(cfg) == 0
    assert "0 units to run" in capsys.readouterr().out
    assert ds.dataset(f"{store.root}/examples", format="parquet").count_rows() == table.num_rows


def test_bad_images_path_is_reported_before_any_work(tmp_path):
    store, _ = _store_with_visualizations(tmp_path / "store", _one_hot_rows(tmp_path, channel=1))
    cfg = compose("examples", f"store.root={store.root}", f"images.path={tmp_path / 'missing'}")
    with pytest.raises(PipelineError, match="ImageFolder"):
        run_examples(cfg)
    assert not (tmp_path / "store" / "examples").exists()


def test_an_mlp_only_store_keeps_the_batch_id_it_had_before_other_unit_kinds(tmp_path, image_folder):
    store = Store(str(tmp_path / "store"))
    _write(store, [_record("mlp", planted.PLANTED_LAYER, f) for f in range(3)])
    cfg = compose("examples", f"store.root={store.root}", f"images.path={image_folder}", "k=3", "slice_size=3")
    image_set = images_lib.open_images(str(image_folder))
    [batch] = plan_batches(store, set(), image_set, cfg)
    # The identity hashed before units of other kinds were ranked: (layer, feature) pairs only.
    before = json.dumps([MODEL, "planted-v1-0", 224, [[planted.PLANTED_LAYER, f] for f in range(3)],
                         image_set.fingerprint(), 3, 3, cfg.thumbnail])
    assert batch.batch_id == hashlib.sha256(before.encode()).hexdigest()[:16]  # its slices and part are reused

    _write(store, [_record("residual", planted.PLANTED_LAYER, 0)])
    [mixed] = plan_batches(store, set(), image_set, cfg)
    assert mixed.batch_id != batch.batch_id  # a unit of another kind is other work


def test_slices_written_before_the_kind_column_merge_as_mlp_channels(tmp_path, image_folder, ray_local, capsys):
    store = Store(str(tmp_path / "store"))
    record = _record("mlp", planted.PLANTED_LAYER, 2)
    _write(store, [record])
    cfg = compose("examples", f"store.root={store.root}", f"images.path={image_folder}", "k=1", "slice_size=8",
                  "progress.bar=false")
    [batch] = plan_batches(store, set(), image_set := images_lib.open_images(str(image_folder)), cfg)
    older = pa.schema([f for f in EXAMPLE_SLICES.schema if f.name != "kind"])
    slice_rows = [{"layer": planted.PLANTED_LAYER, "feature": 2, "rank": 0, "image_id": "a/blue.png",
                   "activation": 3.5, "thumbnail": b"png", "activation_map": [3.5] * 196, "grid_rows": 14,
                   "grid_cols": 14}]
    partial = store.table(EXAMPLE_SLICES)
    store.files.publish_parquet(f"{partial.path}/part-{batch.part_id(0)}.parquet",
                                pa.Table.from_pylist(slice_rows, schema=older))
    assert len(image_set) == 8  # one slice: the batch is complete

    assert run_examples(cfg) == 0
    assert "0 units to run" in capsys.readouterr().out
    [row] = ds.dataset(f"{store.root}/examples", format="parquet").to_table().to_pylist()
    assert (row["key"], row["image_id"], row["activation"]) == (record["key"], "a/blue.png", 3.5)


def test_a_changed_directions_file_fails_its_batch_with_a_clear_message_and_writes_nothing(
        tmp_path, image_folder, ray_local, capsys):
    directions = _one_hot_rows(tmp_path, channel=1)
    store = Store(str(tmp_path / "store"))
    _write(store, [_record("mlp", planted.PLANTED_LAYER, 0, directions)])
    width = zoo.layout(MODEL).site(planted.PLANTED_LAYER, "mlp").features
    np.save(directions["path"], np.ones((2, width), np.float32))  # rewritten after the sweep drew its units
    cfg = compose("examples", f"store.root={store.root}", f"images.path={image_folder}", "k=2", "slice_size=8",
                  "cluster.workers=1", "progress.bar=false")
    assert run_examples(cfg) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out
    assert f"the directions file at {directions['path']} changed since the run was planned: planned " \
           f"{directions['sha256']}" in out
    assert not list((tmp_path / "store").glob("examples*/part-*"))


def test_a_run_killed_and_resumed_gives_exactly_the_planned_keys_direction_units_included(
        tmp_path, image_folder, ray_local, capsys):
    for i in range(8):  # 16 images, one slice each: the job is still running when its first slice is in
        save_image(image_folder / "c" / f"noise{i}.png", np.random.default_rng(i + 10).random((240, 260, 3)))
    store, keys = _store_with_visualizations(tmp_path / "store", _one_hot_rows(tmp_path, channel=1))
    args = [f"store.root={store.root}", f"images.path={image_folder}", "k=2", "slice_size=1", "batch_size=1",
            "cluster.workers=1", "progress.bar=false", "device=cpu"]
    partials = tmp_path / "store" / "examples-partial"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "examples", *args], cwd=tmp_path, env=ENV,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(partials.glob("part-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the job finished before it could be killed; give it more work"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the job's own Ray, which outlives its driver
        except ProcessLookupError:
            pass
    committed = len(list(partials.glob("part-*")))
    assert 0 < committed < 16

    capsys.readouterr()
    assert run_examples(compose("examples", *args)) == 0
    assert f"{16 - committed} units to run" in capsys.readouterr().out  # the committed slices are not redone
    rows = ds.dataset(f"{store.root}/examples", format="parquet").to_table().to_pylist()
    assert sorted({r["key"] for r in rows}) == sorted(keys.values())
    assert sorted((r["key"], r["rank"]) for r in rows) == sorted((key, rank) for key in keys.values()
                                                                 for rank in range(2))
    assert not list(partials.glob("part-*"))
