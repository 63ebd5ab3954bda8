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
Every Parquet part read is first checked for this code's SCHEMA_ID, so a store
written by an incompatible version fails with a clear message, not a type error.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import webdataset
from webdataset import tariterators

from pipeline.errors import PipelineError
from pipeline.store.schemas import RECORD_SCHEMA, SCHEMA_ID
from pipeline.store.store import Store

FILTERS = ("model", "family", "layer", "feature", "config_hash", "target", "weights")
IMAGE_COLUMN = "png"
METADATA_COLUMNS = [name for name in RECORD_SCHEMA.names if name != IMAGE_COLUMN]

FilterValue = Any  # one value, or an iterable of values (strings for names, ints for layer/feature)


class UnknownSchemaError(PipelineError):
    """A Parquet part was written with a record schema this code does not understand."""


def open_store(root_or_uri: str) -> "AtlasStore":
    """Open an existing store for reading; a clear error if there is none at that location."""
    store = Store(root_or_uri)
    try:
        found = store.filesystem.get_file_info(store.paths.parquet).type == pafs.FileType.Directory
    except OSError as err:
        raise PipelineError(
            f"The store at {root_or_uri!r} cannot be read ({err}). Check the location and this machine's "
            "credentials for it."
        ) from err
    if not found:
        raise PipelineError(
            f"No store at {root_or_uri!r}: it has no parquet/ directory of committed records. Point store.root "
            "at the directory a sweep wrote (the sweep's store.root), or run a sweep there first."
        )
    return AtlasStore(store)


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
        self._checked_parts: set[str] = set()

    @property
    def root(self) -> str:
        return self.store.root

    def dataset(self) -> ds.Dataset:
        """The hive-partitioned Parquet records as a pyarrow dataset (RECORD_SCHEMA)."""
        return self.store.parquet_dataset()

    def table(self, *, with_images: bool = False, columns: list[str] | None = None,
              **filters: FilterValue) -> pa.Table:
        """Matching records, sorted by model, layer, feature and key; ``png`` only if asked for."""
        expression = filter_expression(**filters)
        if columns is None:
            columns = RECORD_SCHEMA.names if with_images else METADATA_COLUMNS
        dataset = self._checked_dataset(expression)
        table = dataset.to_table(columns=columns, filter=expression)
        order = [(name, "ascending") for name in ("model", "layer", "feature", "key") if name in columns]
        return table.sort_by(order) if order else table

    def frame(self, *, with_images: bool = False, columns: list[str] | None = None, **filters: FilterValue):
        """Matching records as a pandas DataFrame (``png`` as bytes only if ``with_images``)."""
        return self.table(with_images=with_images, columns=columns, **filters).to_pandas()

    def batches(self, columns: list[str], batch_size: int = 256, **filters: FilterValue) -> Iterator[pa.RecordBatch]:
        """Matching records in bounded batches, for passes over more image bytes than fit in memory."""
        expression = filter_expression(**filters)
        scanner = self._checked_dataset(expression).scanner(columns=columns, filter=expression,
                                                            batch_size=batch_size)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield batch

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
        dataset = self._checked_dataset(pruning)
        if pruning is not None:
            expression = expression & pruning
        scanner = dataset.scanner(columns=columns, filter=expression, batch_size=batch_size)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield batch

    def torch_samples(self, **filters: FilterValue) -> webdataset.DataPipeline:
        """A PyTorch IterableDataset over the WebDataset shards of matching records.

        Each sample is ``{"key": str, "image": FloatTensor[3, H, W] in [0, 1], "metadata": dict}``
        with the record's non-image fields as metadata. Shards are split across
        DataLoader workers and distributed ranks, so each sample is read once.
        Batch with ``collate_fn=collate_samples``: metadata holds nulls and
        variable-length traces, which torch's default collate rejects.
        """
        shards, keys = self._matching_shards(filter_expression(**filters))
        # Shards are opened through the store's pyarrow filesystem, so object-store roots work too.
        filesystem = self.store.filesystem

        def shard_sources():  # SimpleShardList would reject an empty list; no match is a valid result
            return iter([dict(url=final, staged=staged) for final, staged in shards])

        def open_shards(sources):
            for source in sources:
                # Final name, else staged (not moved into place yet), else final again
                # (moved between the first two tries); the last try's error is the real one.
                attempts = (source["url"], source["staged"], source["url"])
                for attempt, path in enumerate(attempts, 1):
                    try:
                        stream = filesystem.open_input_stream(path)
                        break
                    except OSError:
                        if attempt == len(attempts):
                            raise
                yield dict(source, stream=stream)

        def to_sample(raw: dict) -> dict:
            return {"key": raw["__key__"], "image": raw["png"], "metadata": json.loads(raw["json"])}

        return webdataset.DataPipeline(
            shard_sources,
            webdataset.split_by_node,
            webdataset.split_by_worker,
            open_shards,
            tariterators.tar_file_expander,
            tariterators.group_by_keys,
            webdataset.select(lambda raw: raw["__key__"] in keys),
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

    # -------------------------------------------------------------- internals

    def _checked_dataset(self, expression: ds.Expression | None) -> ds.Dataset:
        """The dataset, after checking the schema id of every part the expression can touch."""
        dataset = self.dataset()
        fragments = list(dataset.get_fragments(filter=expression)) if expression is not None else list(
            dataset.get_fragments())
        for fragment in fragments:
            if fragment.path in self._checked_parts:
                continue
            metadata = fragment.physical_schema.metadata or {}
            found = metadata.get(b"schema_id", b"").decode() or "none"
            if found != SCHEMA_ID:
                raise UnknownSchemaError(
                    f"The Parquet part {fragment.path} was written with record schema {found!r}, but this "
                    f"version of vit-atlas reads {SCHEMA_ID!r}. Read the store with the vit-atlas version "
                    "that wrote it, or rewrite the part with this version; parts from other tools do not "
                    "belong under the store's parquet/ directory."
                )
            self._checked_parts.add(fragment.path)
        return dataset

    def _matching_shards(self, expression: ds.Expression | None) -> tuple[list[tuple[str, ...]], set[str]]:
        """Per part with matching records, where its shard may be (a part and its shard share a
        commit id), and the matching keys."""
        dataset = self._checked_dataset(expression)
        present = {info.path for info in self.store.filesystem.get_file_info(
            pafs.FileSelector(self.store.paths.webdataset, allow_not_found=True))}
        shards, keys = [], set()
        for fragment in dataset.get_fragments(filter=expression):
            matched = fragment.to_table(columns=["key"], filter=expression)["key"].to_pylist()
            if not matched:
                continue
            commit_id = posixpath.basename(fragment.path)[len("part-"):-len(".parquet")]
            staged, final = self.store._shard_locations(commit_id)
            # A committed part's shard is complete under either name: staged until
            # the writer (or the next writer, after a crash) moves it into place.
            if final not in present and staged not in present:
                raise PipelineError(
                    f"The store at {self.root!r} has the Parquet part {fragment.path} but no WebDataset shard "
                    f"for it ({posixpath.basename(final)}). Read this store through table()/frame(), or restore "
                    "the webdataset/ directory from the same copy as parquet/."
                )
            shards.append((final, staged))
            keys.update(matched)
        return sorted(shards), keys

def collate_samples(samples: list[dict]) -> dict:
    """Batch torch_samples(): images stacked into one tensor, keys and metadata kept as lists."""
    import torch

    return {
        "key": [sample["key"] for sample in samples],
        "image": torch.stack([sample["image"] for sample in samples]),
        "metadata": [sample["metadata"] for sample in samples],
    }
