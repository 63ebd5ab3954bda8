"""Reading a store for downstream study: Arrow/pandas tables, PyTorch samples, Hugging Face datasets.

    from pipeline.views.readers import open_store
    atlas = open_store("/data/atlas")                 # or s3://bucket/atlas, gs://...
    frame = atlas.frame(model="deit_tiny_patch16_224", layer=[0, 11])   # no image bytes
    table = atlas.table(family="clip", with_images=True)                 # png column included
    for sample in atlas.torch_samples(layer=5): sample["image"]          # float CHW tensor in [0, 1]
    hf = atlas.huggingface(model="deit_tiny_patch16_224")                # hf["image"][0] is a PIL image

Every reader takes the same filters: ``model``, ``family``, ``layer``, ``feature``,
``config_hash``, ``target``, ``weights``, each a single value or a list of values.
Image bytes are the bulk of a store, so tables leave the ``png`` column out
unless ``with_images=True``, and the WebDataset reader opens only the shards
that hold a matching record (a shard belongs to one commit of one model).
Every Parquet part read is first checked by the store for a schema id this code
reads, so a store written by an incompatible version fails with a clear message.

What records measure on their images (docs/store.md) comes with two readers that
join across records: ``measurements()`` (descriptors, baselines, the top natural
activation from the examples table and the superstimulus ratio, reliability) and
``reliability()`` (the agreement of a unit's seeds, from their stored embeddings)::

    atlas.reliability(model="deit_tiny_patch16_224")      # one row per unit visualized with >= 2 seeds
    atlas.measurements(layer=3).to_pandas().sort_values("superstimulus_ratio")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import webdataset
from webdataset import tariterators

from pipeline.errors import PipelineError
from pipeline.store.schemas import BASELINE_COLUMNS, DESCRIPTOR_COLUMNS, EMBEDDING_COLUMN, EXAMPLES, RECORD_SCHEMA
from pipeline.store.errors import DamagedStoreError, repair_command
from pipeline.store.store import Store

FILTERS = ("model", "family", "layer", "feature", "config_hash", "target", "weights")
IMAGE_COLUMN = "png"
METADATA_COLUMNS = [name for name in RECORD_SCHEMA.names if name != IMAGE_COLUMN]
# A sample's metadata before its shard's JSON: the columns an older record's JSON lacks read as None.
_ABSENT = dict.fromkeys(METADATA_COLUMNS)

FilterValue = Any  # one value, or an iterable of values (strings for names, ints for layer/feature)

# A unit but for its seed: the records whose images reliability compares.
SEED_GROUP = ("model", "weights", "target", "objective", "layer", "feature", "config_hash")
RELIABILITY_SCHEMA = pa.schema([*(RECORD_SCHEMA.field(name) for name in SEED_GROUP),
                                pa.field("seeds", pa.int32(), nullable=False),
                                pa.field("reliability", pa.float64())])
# Units measured per reliabilities() call: their seeds' embeddings in float64 stay near 75 MB at ViT-B's
# 3,072 values and 3 seeds.
RELIABILITY_UNITS = 1024
_MEASUREMENT_COLUMNS = ["key", "family", *SEED_GROUP, "seed", "label", "activation", *DESCRIPTOR_COLUMNS,
                        *BASELINE_COLUMNS]


def open_store(root_or_uri: str) -> "AtlasStore":
    """Open an existing store for reading; a clear error if there is none at that location."""
    return AtlasStore(Store.existing(root_or_uri))


def filter_expression(**filters: FilterValue) -> ds.Expression | None:
    """An Arrow filter for the given column filters (None when no filter is given)."""
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise PipelineError(
            f"Unknown filter(s) {', '.join(unknown)}: records can be filtered by {', '.join(FILTERS)}."
        )
    expression = None
    for name, value in filters.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, int)) else list(value)
        field_type = RECORD_SCHEMA.field(name).type
        try:
            value_set = pa.array(values, type=field_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise PipelineError(
                f"Filter {name}={value!r} does not match the column's type ({field_type}): {err}. Pass "
                f"{'integers' if pa.types.is_integer(field_type) else 'strings'} for {name}."
            ) from err
        condition = ds.field(name).isin(value_set)
        expression = condition if expression is None else expression & condition
    return expression


class AtlasStore:
    """Read-only views of one store's committed records."""

    def __init__(self, store: Store):
        self.store = store

    @property
    def root(self) -> str:
        return self.store.root

    def dataset(self) -> ds.Dataset:
        """The hive-partitioned Parquet records as a pyarrow dataset (RECORD_SCHEMA)."""
        return self.store.parquet_dataset()

    def versions(self) -> dict[str, str]:
        """The record schema id each committed part was written with, by path. A ``vit-atlas/record/v1``
        part has no measured columns (descriptors, baselines, embedding): they read as null."""
        return self.store.versions()

    def reliability(self, **filters: FilterValue) -> pa.Table:
        """Per unit but its seed (SEED_GROUP) with >= 2 seeds' embeddings: how many, and their reliability.

        Reliability is the mean cosine similarity over all pairs of the seeds' embeddings
        (``descriptors.reliability``), each first centred on the mean embedding of the *other* units of
        the same model and weights in the store: pooled ViT features share a large common component, so
        uncentred any two images look alike (cosine near 1). 1: every seed's image differs from the
        model's other visualizations in the same way; near 0 or below: the seeds found unrelated images.
        Null where the store has no other unit of that model and weights to centre on. Records without
        an embedding (v1 parts) are left out. Filters choose the units reported, not the centre.
        """
        from pipeline.engine.descriptors import reliabilities

        wanted = self.table(columns=list(SEED_GROUP), **filters)
        units = {tuple(row[name] for name in SEED_GROUP) for row in wanted.to_pylist()}
        models = sorted({unit[:2] for unit in units})  # (model, weights)
        # Unsorted, and copied only where records lack an embedding: a sorted or filtered copy of 100,000
        # embeddings of deit_base (3,072 floats each) is 1.2 GB more.
        table = _first_per_key(self.store.read_records([*SEED_GROUP, "seed", "key", EMBEDDING_COLUMN],
                                                       filter_expression(model=sorted({m for m, _ in models}))))
        if table[EMBEDDING_COLUMN].null_count:
            table = table.filter(pc.is_valid(table[EMBEDDING_COLUMN]))
        # Embeddings stay in Arrow and numpy (one float32 matrix per model and weights): as Python lists
        # they cost about 25 KB per record (hundreds of floats each), which an atlas of 100,000 records
        # would hold at once.
        row_units = list(zip(*(table[name].to_pylist() for name in SEED_GROUP)))
        members: dict[tuple, list[int]] = {}  # (model, weights) -> its rows of the table
        for row, unit in enumerate(row_units):
            members.setdefault(unit[:2], []).append(row)
        matrices = _embedding_matrices(table[EMBEDDING_COLUMN], [unit[:2] for unit in row_units],
                                       {group: len(rows) for group, rows in members.items()})
        del table
        by_unit: dict[tuple, list[int]] = {}  # unit -> its rows of its group's matrix
        for group, rows in members.items():
            for position, row in enumerate(rows):
                by_unit.setdefault(row_units[row], []).append(position)
        reported = sorted(unit for unit, positions in by_unit.items() if unit in units and len(positions) >= 2)
        batches: dict[tuple, list[tuple]] = {}  # ((model, weights), seeds) -> its units, measured together
        for unit in reported:
            batches.setdefault((unit[:2], len(by_unit[unit])), []).append(unit)
        totals = {group: matrix.sum(axis=0, dtype=np.float64) for group, matrix in matrices.items()}
        values: dict[tuple, float | None] = {}
        for (group, seeds), batch in batches.items():
            matrix, total = matrices[group], totals[group]
            others = len(matrix) - seeds
            if not others:  # the model's only unit: nothing to centre on
                values.update(dict.fromkeys(batch, None))
                continue
            for start in range(0, len(batch), RELIABILITY_UNITS):
                part = batch[start:start + RELIABILITY_UNITS]
                vectors = matrix[np.array([by_unit[unit] for unit in part])]  # (units, seeds, width)
                centres = (total - vectors.sum(axis=1, dtype=np.float64)) / others  # the other units' mean
                values.update(zip(part, reliabilities(vectors, centres).tolist()))
        rows = [{**dict(zip(SEED_GROUP, unit)), "seeds": len(by_unit[unit]), "reliability": values[unit]}
                for unit in reported]
        return pa.Table.from_pylist(rows, schema=RELIABILITY_SCHEMA)

    def measurements(self, **filters: FilterValue) -> pa.Table:
        """One row per record: its unit, activation, descriptors and baselines (null for v1 parts), with
        ``top_natural`` (the rank-0 activation of the examples table, null without one),
        ``superstimulus_ratio`` (activation / top_natural, ``descriptors.superstimulus_ratio``: > 1 drives
        the unit beyond every natural image tried) and its unit's ``reliability`` (null under 2 seeds)."""
        from pipeline.engine.descriptors import superstimulus_ratio

        table = self.table(columns=_MEASUREMENT_COLUMNS, **filters)
        top = self.top_natural(table["key"].to_pylist())
        reliable = {tuple(row[name] for name in SEED_GROUP): row["reliability"]
                    for row in self.reliability(**filters).to_pylist()}
        rows = table.to_pylist()
        tops = [top.get(row["key"]) for row in rows]
        ratios = [None if t is None else superstimulus_ratio(row["activation"], t) for row, t in zip(rows, tops)]
        return (table.append_column("top_natural", pa.array(tops, pa.float64()))
                .append_column("superstimulus_ratio", pa.array(ratios, pa.float64()))
                .append_column("reliability", pa.array(
                    [reliable.get(tuple(row[name] for name in SEED_GROUP)) for row in rows], pa.float64())))

    def top_natural(self, keys: list[str]) -> dict[str, float]:
        """Per key with dataset examples (``vit-atlas examples``), its most activating natural image's activation."""
        examples = self.store.table(EXAMPLES)
        if not examples.done() or not keys:
            return {}
        found = examples.read(columns=["key", "activation"], filter=(ds.field("rank") == 0)
                              & ds.field("key").isin(pa.array(sorted(set(keys)), pa.string())))
        return dict(zip(found["key"].to_pylist(), found["activation"].to_pylist()))

    def examples(self, keys: Iterable[str]) -> dict[str, list[dict]]:
        """Per key with dataset examples (``vit-atlas examples``), its rows of the examples table (thumbnail and
        activation map included), most activating first; a key without examples is absent."""
        examples = self.store.table(EXAMPLES)
        keys = sorted(set(keys))
        if not examples.done() or not keys:
            return {}
        return examples_by_key(examples.read(columns=EXAMPLES.schema.names, filter=ds.field("key").isin(
            pa.array(keys, pa.string()))))

    def table(self, *, with_images: bool = False, columns: list[str] | None = None,
              **filters: FilterValue) -> pa.Table:
        """Matching records, sorted by model, layer, feature and key; ``png`` only if asked for."""
        expression = filter_expression(**filters)
        if columns is None:
            columns = RECORD_SCHEMA.names if with_images else METADATA_COLUMNS
        table = _first_per_key(self.store.read_records(list(dict.fromkeys([*columns, "key"])), expression))
        order = [(name, "ascending") for name in ("model", "layer", "feature", "key") if name in columns]
        return (table.sort_by(order) if order else table).select(columns)

    def frame(self, *, with_images: bool = False, columns: list[str] | None = None, **filters: FilterValue):
        """Matching records as a pandas DataFrame (``png`` as bytes only if ``with_images``)."""
        return self.table(with_images=with_images, columns=columns, **filters).to_pandas()

    def batches(self, columns: list[str], batch_size: int = 256, **filters: FilterValue) -> Iterator[pa.RecordBatch]:
        """Matching records in bounded batches, for passes over more image bytes than fit in memory."""
        expression = filter_expression(**filters)
        yield from _once_per_key(self.store.record_batches(columns, expression, batch_size), columns)

    def keyed_batches(self, keys: Iterable[str], columns: list[str], batch_size: int = 256,
                      **filters: FilterValue) -> Iterator[pa.RecordBatch]:
        """Records with the given keys, in bounded batches (how the atlas reads images of new keys only).

        Filters such as ``model`` are optional; they only spare reading parts that hold none of the keys.
        """
        key_set = pa.array(sorted(set(keys)), type=pa.string())
        if not len(key_set):
            return
        pruning = filter_expression(**filters)
        expression = ds.field("key").isin(key_set)
        if pruning is not None:
            expression = expression & pruning
        yield from _once_per_key(self.store.record_batches(columns, expression, batch_size), columns)

    def torch_samples(self, **filters: FilterValue) -> webdataset.DataPipeline:
        """A PyTorch IterableDataset over the WebDataset shards of matching records.

        Each sample is ``{"key": str, "image": FloatTensor[3, H, W] in [0, 1], "metadata": dict}``
        with the record's non-image fields as metadata, every column of METADATA_COLUMNS: None where the
        record's schema version lacks it, as in the tables (``activation_curve`` before record schema v3, the
        measured columns before v2). Shards are split across
        DataLoader workers and distributed ranks, so each sample is read once.
        Batch with ``collate_fn=collate_samples``: metadata holds nulls and
        variable-length traces and curves, which torch's default collate rejects.
        """
        wanted = self.store.shards_with(filter_expression(**filters))
        store = self.store

        def shard_sources():  # SimpleShardList would reject an empty list; no match is a valid result
            return iter([dict(url=commit) for commit in sorted(wanted)])

        def open_shards(sources):
            for source in sources:
                yield dict(source, stream=store.open_shard(source["url"]))

        def complete(samples):
            """Each shard's wanted records, and an error naming those it lacks: a damaged tar header
            ends Python's tar reading early without an error, which would drop records silently."""
            commit, seen = None, set()
            for raw in samples:
                if raw["__url__"] != commit:
                    _check_read(store, commit, wanted, seen)
                    commit, seen = raw["__url__"], set()
                if raw["__key__"] in wanted[commit] and raw["__key__"] not in seen:
                    seen.add(raw["__key__"])
                    yield raw
            _check_read(store, commit, wanted, seen)

        def to_sample(raw: dict) -> dict:
            return {"key": raw["__key__"], "image": raw["png"], "metadata": {**_ABSENT, **json.loads(raw["json"])}}

        return webdataset.DataPipeline(
            shard_sources,
            webdataset.split_by_node,
            webdataset.split_by_worker,
            open_shards,
            tariterators.tar_file_expander,
            tariterators.group_by_keys,
            complete,
            webdataset.decode("torchrgb", only=["png"]),
            webdataset.map(to_sample),
        )

    def huggingface(self, **filters: FilterValue):
        """Matching records as a ``datasets.Dataset`` whose ``image`` column decodes to PIL images."""
        import datasets

        table = self.table(with_images=True, **filters)
        # Hugging Face's Image feature stores {bytes, path}; the PNG bytes need no re-encoding.
        images = pa.StructArray.from_arrays(
            [table[IMAGE_COLUMN].combine_chunks(), pa.nulls(table.num_rows, type=pa.string())],
            names=["bytes", "path"],
        )
        table = table.drop_columns([IMAGE_COLUMN]).append_column("image", images)
        features = datasets.Features.from_arrow_schema(table.schema)
        features["image"] = datasets.Image()
        return datasets.Dataset(datasets.table.InMemoryTable(table.cast(features.arrow_schema)),
                                info=datasets.DatasetInfo(features=features))


def examples_by_key(table: pa.Table) -> dict[str, list[dict]]:
    """Rows of the examples table grouped by key, each key's most activating first."""
    found: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        found.setdefault(row["key"], []).append(row)
    return {key: sorted(rows, key=lambda r: r["rank"]) for key, rows in found.items()}


def _embedding_matrices(embeddings: pa.ChunkedArray, groups: list[tuple], sizes: dict[tuple, int]
                        ) -> dict[tuple, np.ndarray]:
    """Per group (model, weights), the (records, width) float32 matrix of its rows' embeddings in table
    order, filled chunk by chunk: each embedding is copied once, into its matrix."""
    matrices: dict[tuple, np.ndarray] = {}
    filled = dict.fromkeys(sizes, 0)
    start = 0
    for chunk in embeddings.chunks:
        rows: dict[tuple, list[int]] = {}
        for row, group in enumerate(groups[start:start + len(chunk)]):
            rows.setdefault(group, []).append(row)
        start += len(chunk)
        for group, picked in rows.items():
            part = chunk if len(picked) == len(chunk) else chunk.take(pa.array(picked, pa.int64()))
            values = _embedding_matrix(part, group)
            if group not in matrices:
                matrices[group] = np.empty((sizes[group], values.shape[1]), dtype=np.float32)
            elif matrices[group].shape[1] != values.shape[1]:
                raise ValueError(f"The embeddings of {group[0]} (weights {group[1]}) differ in length: "
                                 f"{sorted({matrices[group].shape[1], values.shape[1]})}.")
            matrices[group][filled[group]:filled[group] + len(values)] = values
            filled[group] += len(values)
    return matrices


def _embedding_matrix(embeddings: pa.ListArray, group: tuple) -> np.ndarray:
    """(records, width) float32 of one model's embeddings, which all have its width."""
    widths = set(pc.list_value_length(embeddings).to_pylist())
    if len(widths) != 1:
        raise ValueError(f"The embeddings of {group[0]} (weights {group[1]}) differ in length: {sorted(widths)}.")
    values = pc.list_flatten(embeddings).to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(embeddings), widths.pop())


def _first_per_key(table: pa.Table) -> pa.Table:
    """One row per key. A key can be committed twice (a driver paused between its lease check and its
    commit point; stores two drivers wrote before leases): the store reads parts in commit order
    (``Store.parquet_dataset``), so the first row is the copy that counts, the same in every view."""
    if pc.count_distinct(table["key"]).as_py() == table.num_rows:
        return table
    rows = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    first = rows.group_by("key", use_threads=False).aggregate([("__row", "min")])["__row_min"]
    return table.take(pc.take(first, pc.sort_indices(first)))


def _once_per_key(batches: Iterator[pa.RecordBatch], columns: list[str]) -> Iterator[pa.RecordBatch]:
    seen: set[str] = set()
    for batch in batches:
        keys = batch.column("key").to_pylist()
        fresh = [i for i, key in enumerate(keys) if key not in seen]
        seen.update(keys)
        if len(fresh) < len(keys):
            batch = batch.take(pa.array(fresh, pa.int64()))
        if batch.num_rows:
            yield batch.select(columns)


def _check_read(store: Store, commit: str | None, wanted: dict[str, set[str]], seen: set[str]) -> None:
    if commit is None:
        return
    missing = sorted(wanted[commit] - seen)
    if missing:
        raise DamagedStoreError(
            f"The WebDataset shard of commit {commit} in {store.root!r} lacks {len(missing)} of the "
            f"{len(wanted[commit])} records its Parquet part holds (first: {missing[0]}). Run "
            f"`{repair_command(store.root)}`: it rebuilds the shard from its part."
        )


def collate_samples(samples: list[dict]) -> dict:
    """Batch torch_samples(): images stacked into one tensor, keys and metadata kept as lists."""
    import torch

    return {
        "key": [sample["key"] for sample in samples],
        "image": torch.stack([sample["image"] for sample in samples]),
        "metadata": [sample["metadata"] for sample in samples],
    }
