"""The reader API: filtered tables without image bytes, PyTorch samples, Hugging Face datasets, schema checks."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.store.store import UnknownSchemaError
from pipeline.views.readers import METADATA_COLUMNS, collate_samples, open_store
from pipeline.store.schemas import RECORD_SCHEMA
from synthetic_store import CLIP, DEIT, IMAGE_SIZE, RECORD_COUNT, write_store


def test_tables_filter_and_leave_images_out_unless_asked(synthetic_store_root):
    atlas = open_store(str(synthetic_store_root))
    everything = atlas.table()
    assert everything.num_rows == RECORD_COUNT
    assert everything.column_names == METADATA_COLUMNS and "png" not in everything.column_names

    assert set(atlas.table(family="clip")["model"].to_pylist()) == {CLIP}
    chosen = atlas.table(model=DEIT, layer=[0, 3], feature=2)
    assert sorted(chosen["layer"].to_pylist()) == [0, 3]
    assert set(chosen["feature"].to_pylist()) == {2}
    assert atlas.table(config_hash="other").num_rows == 0

    with_images = atlas.table(with_images=True, model=CLIP, layer=1)
    assert with_images.column_names == RECORD_SCHEMA.names
    assert all(png.startswith(b"\x89PNG") for png in with_images["png"].to_pylist())

    frame = atlas.frame(weights="planted-v1-0")
    assert sorted(frame["label"]) == ["planted: grating 45°", "planted: red"]
    batches = list(atlas.batches(["key", "png"], batch_size=4, model=DEIT))
    assert sum(batch.num_rows for batch in batches) == 18 and max(batch.num_rows for batch in batches) <= 4


def test_torch_samples_are_decoded_tensors_with_metadata(synthetic_store_root):
    atlas = open_store(str(synthetic_store_root))
    samples = list(atlas.torch_samples(model=CLIP))
    assert len(samples) == 6
    assert {s["metadata"]["model"] for s in samples} == {CLIP}
    assert set(samples[0]["metadata"]) == set(METADATA_COLUMNS)
    by_key = {row["key"]: row for row in atlas.table(model=CLIP).to_pylist()}
    for sample in samples:  # the variable-length lists as the tables hold them
        for name in ("activation_trace", "activation_curve"):
            assert sample["metadata"][name] == pytest.approx(by_key[sample["key"]][name]), name
    image = samples[0]["image"]
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert list(atlas.torch_samples(layer=99)) == []

    loader = torch.utils.data.DataLoader(atlas.torch_samples(layer=1), batch_size=4, collate_fn=collate_samples)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 4 + 2 + 3  # random deit, planted deit, clip at layer 1
    assert batches[0]["image"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert all(len(m["activation_curve"]) == 3 for b in batches for m in b["metadata"])


def test_torch_samples_read_a_committed_shard_not_yet_moved_into_place(tmp_path):
    write_store(tmp_path)
    atlas = open_store(str(tmp_path))
    (part,) = tmp_path.glob(f"parquet/model={CLIP}/part-*.parquet")
    final = tmp_path / "webdataset" / f"shard-{part.stem.removeprefix('part-')}.tar"
    final.rename(final.with_name(f".{final.name}.staged"))  # as a writer killed between commit and move leaves it
    assert len(list(atlas.torch_samples(model=CLIP))) == 6
    (tmp_path / "webdataset" / f".{final.name}.staged").unlink()
    with pytest.raises(PipelineError, match="no WebDataset shard"):
        atlas.torch_samples(model=CLIP)


def test_huggingface_dataset_decodes_images(synthetic_store_root):
    import datasets

    hf = open_store(str(synthetic_store_root)).huggingface(model=DEIT, layer=2)
    assert hf.num_rows == 4 and isinstance(hf.features["image"], datasets.Image)
    first = hf[0]
    assert first["image"].size == (IMAGE_SIZE, IMAGE_SIZE) and first["layer"] == 2
    assert first["activation_curve"] == pytest.approx([first["activation"] / 4, first["activation"] / 2,
                                                       first["activation"]])


def test_unknown_schema_missing_store_and_bad_filters_fail_clearly(synthetic_store_root, tmp_path):
    with pytest.raises(PipelineError, match="No store at"):
        open_store(str(tmp_path / "missing"))
    atlas = open_store(str(synthetic_store_root))
    with pytest.raises(PipelineError, match="Unknown filter.*colour"):
        atlas.table(colour="red")
    with pytest.raises(PipelineError, match="integers for layer"):
        atlas.table(layer="early")

    foreign = tmp_path / "foreign"
    write_store(foreign)
    table = open_store(str(foreign)).table(with_images=True, model=CLIP)
    newer = table.replace_schema_metadata({"schema_id": "vit-atlas/record/v9"})
    pq.write_table(newer, foreign / "parquet" / f"model={CLIP}" / "part-newer.parquet")
    reader = open_store(str(foreign))
    assert reader.table(model=DEIT).num_rows == 18  # the pruned partition is never opened
    with pytest.raises(UnknownSchemaError, match="'vit-atlas/record/v9'.*reads 'vit-atlas/record/v1' and "
                                                 "'vit-atlas/record/v2' and 'vit-atlas/record/v3'"):
        reader.table(model=CLIP)
