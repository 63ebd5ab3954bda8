"""What the worker measures on each record's image: descriptors, the noise and grey baselines, an embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.engine import measures
from pipeline.engine.descriptors import DESCRIPTORS, describe_png
from pipeline.engine.objectives import PatchMean
from pipeline.execution import worker
from pipeline.execution.plan import build_plan
from pipeline.store.png import decode_png
from pipeline.store.schemas import DESCRIPTOR_COLUMNS, MEASURED_COLUMNS

MODEL = "deit_tiny_patch16_224"


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_the_schema_has_a_column_per_descriptor_in_their_order():
    assert list(DESCRIPTOR_COLUMNS) == list(DESCRIPTORS)


@pytest.fixture(scope="module")
def made():
    """Two planted features of layer 1, two steps: the worker's records and the model it loaded."""
    from pipeline import cli

    cfg = cli.load("sweep", f"sweep.models=[{MODEL}]", "model.weights=planted", "sweep.layers=[1]",
                   "sweep.features=[0,1]", "optim.steps=2", "optim.copies=1")
    chunk = build_plan(cfg).chunks(set(), 8)[0]
    runner = worker.VisualizationWorker("cpu")
    result = runner.run(chunk)
    assert not result.failures and len(result.records) == 2
    return result.records.table.to_pylist(), runner.visualizer(chunk)  # the values as the store gets them


def test_worker_records_carry_the_descriptors_of_their_own_png(made):
    records, _ = made
    for record in records:
        expected = describe_png(record["png"])
        assert all(same(record[name], value) for name, value in expected.items()), record["key"]
        assert record["png_bytes"] == len(record["png"])
    assert records[0]["png_bytes"] != records[1]["png_bytes"]  # two images, two measurements


def test_worker_baselines_are_the_score_of_the_units_noise_and_of_mean_grey(made):
    records, visualizer = made
    for record in records:
        # in the precision the worker measured them in (auto: bf16 where it is native and faster)
        score = visualizer.score(1, "mlp", PatchMean(), [record["feature"]], record["precision"])
        seed = measures.noise_seed(MODEL, record["weights"], "mlp", "mean", 1, record["feature"])
        noise = measures.noise_image(seed, (224, 224))
        with torch.no_grad():
            on_noise = float(score(noise[None, None]))
            on_grey = float(score(torch.full((1, 1, 3, 224, 224), 0.5)))
        assert record["activation_noise"] == pytest.approx(on_noise, rel=1e-4, abs=1e-5)
        assert record["activation_grey"] == pytest.approx(on_grey, rel=1e-4, abs=1e-5)
        assert record["activation_noise"] != pytest.approx(record["activation_grey"])
    # the noise belongs to the feature: another seed of it meets the same noise, another feature other noise
    assert measures.noise_seed(MODEL, "w", "mlp", "mean", 1, 0) != measures.noise_seed(MODEL, "w", "mlp", "mean", 1, 1)


def test_worker_embedding_is_the_patch_mean_of_the_stored_image_at_the_early_layer(made):
    records, visualizer = made
    images = torch.stack([torch.from_numpy(np.array(decode_png(r["png"]))).permute(2, 0, 1) for r in records])
    expected = visualizer.pooled_features(images.float() / 255, measures.EMBEDDING_LAYER)
    for record, row in zip(records, expected):
        assert len(record["embedding"]) == 768  # deit_tiny's MLP width
        assert np.allclose(record["embedding"], row.numpy(), rtol=1e-4, atol=1e-5)
    assert set(MEASURED_COLUMNS) <= set(records[0])
