"""Dataset examples: the dataset images that most excite each visualized feature.

    vit-atlas examples store.root=DIR images.path=PATH [k=9] [images.limit=N] [cluster=ray]

For every MLP feature visualized in the store with the ``mean`` objective, the
top-k images of ``images.path`` by that feature's patch-mean activation, with the
activation map over the patch grid and a thumbnail, land in
``ROOT/examples/part-*.parquet`` under the visualization's key (EXAMPLE_SCHEMA),
for the atlas to show beside the visualization.

Work is planned per (model, weights): one *batch* holds every feature that model
still needs, and its units are slices of the image set; a worker computes all
the batch's features for its slice in one pass. Each finished slice is committed
to ``ROOT/examples-partial/`` at once; when a batch's slices are all there, they
are merged into its final part and the partials are removed. A re-run skips keys
that have examples and slices already committed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pipeline.analysis import images as images_lib
from pipeline.config import ExamplesConfig
from pipeline.models import weights as weights_lib
from pipeline.errors import PipelineError
from pipeline.analysis.example_worker import PARTIAL_SCHEMA, ExampleTask, ExampleWorker
from pipeline.store.parts import PartTable
from pipeline.store.store import Store

EXIT_FAILURES = 1

EXAMPLE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the visualization's key
    pa.field("rank", pa.int32(), nullable=False),  # 0 = most activating
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("activation", pa.float64(), nullable=False),  # patch-mean activation (the sweep's objective)
    pa.field("thumbnail", pa.binary(), nullable=False),  # PNG of the model's crop
    pa.field("activation_map", pa.list_(pa.float32()), nullable=False),  # row-major over the patch grid
    pa.field("grid_rows", pa.int32(), nullable=False),
    pa.field("grid_cols", pa.int32(), nullable=False),
])


@dataclass(frozen=True)
class Batch:
    """One (model, weights): the features still needing examples, and which keys each one serves."""

    batch_id: str
    model: str
    weights: weights_lib.WeightsChoice
    keys: dict[tuple[int, int], tuple[str, ...]]  # (layer, feature) -> visualization keys

    @property
    def features(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self.keys))

    def part_id(self, slice_index: int) -> str:
        return f"{self.batch_id}-{slice_index:06d}"


def example_tables(store: Store) -> tuple[PartTable, PartTable]:
    return PartTable(store, "examples", EXAMPLE_SCHEMA), PartTable(store, "examples-partial", PARTIAL_SCHEMA)


def plan_batches(store: Store, done_keys: set[str], image_set: images_lib.ImageSet, cfg: ExamplesConfig) -> list[Batch]:
    """Batches for the store's mean-objective MLP visualizations that have no examples yet."""
    table = store.parquet_dataset().to_table(
        columns=["key", "model", "weights", "layer", "feature", "config"],
        filter=(ds.field("target") == "mlp") & (ds.field("objective") == "mean"))
    table = table.filter(pc.invert(pc.is_in(table["key"], value_set=pa.array(sorted(done_keys), pa.string()))))
    grouped: dict[tuple[str, str], dict[tuple[int, int], list[str]]] = {}
    configs: dict[tuple[str, str], str] = {}
    for row in table.to_pylist():
        group = (row["model"], row["weights"])
        grouped.setdefault(group, {}).setdefault((row["layer"], row["feature"]), []).append(row["key"])
        configs[group] = row["config"]
    batches = []
    for (model, weights_id), keys in sorted(grouped.items()):
        choice = _weights_for(model, weights_id, configs[(model, weights_id)], cfg.weights)
        identity = json.dumps([model, weights_id, sorted(keys), image_set.fingerprint(), cfg.k, cfg.slice_size,
                               cfg.thumbnail])
        batch_id = hashlib.sha256(identity.encode()).hexdigest()[:16]
        batches.append(Batch(batch_id, model, choice, {f: tuple(sorted(k)) for f, k in keys.items()}))
    return batches


def _weights_for(model: str, weights_id: str, config_json: str, override: str | None) -> weights_lib.WeightsChoice:
    """The weights a visualization was made with, recovered from its record (or the override path)."""
    kind, _, rest = weights_id.partition("-")
    if kind == "random":
        choice = weights_lib.resolve(model, "random", int(rest))
    elif kind == "planted":
        choice = weights_lib.resolve(model, "planted", int(rest.rpartition("-")[2]))
    else:
        recorded = override or json.loads(config_json).get("weights", "")
        try:
            choice = weights_lib.resolve(model, recorded)
        except PipelineError as error:
            raise PipelineError(
                f"The visualizations of '{model}' were made with weights {weights_id} from '{recorded}', which "
                f"cannot be loaded here: {error} Pass weights=PATH (the checkpoint file or a directory of "
                f"<model>.safetensors files) to point at the same weights."
            ) from None
    if choice.weights_id != weights_id:
        raise PipelineError(
            f"The visualizations of '{model}' were made with weights {weights_id}, but the weights found "
            f"('{override or 'as recorded'}') are {choice.weights_id}. Examples must come from the same weights: "
            f"pass weights=PATH to the checkpoint the sweep used."
        )
    return choice


def merge(batch: Batch, partial: pa.Table, k: int) -> pa.Table:
    """The batch's top-k per feature over all slices, one row set per visualization key."""
    rows = partial.to_pylist()
    by_feature: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        by_feature.setdefault((row["layer"], row["feature"]), []).append(row)
    out = []
    for feature, candidates in sorted(by_feature.items()):
        candidates.sort(key=lambda r: (-r["activation"], r["image_id"]))  # ties broken by id: deterministic
        for rank, row in enumerate(candidates[:k]):
            for key in batch.keys[feature]:
                out.append({"key": key, "rank": rank, "image_id": row["image_id"], "activation": row["activation"],
                            "thumbnail": row["thumbnail"], "activation_map": row["activation_map"],
                            "grid_rows": row["grid_rows"], "grid_cols": row["grid_cols"]})
    return pa.Table.from_pylist(out, schema=EXAMPLE_SCHEMA)


def _check(cfg: ExamplesConfig) -> None:
    for name, low in (("k", 1), ("slice_size", 1), ("batch_size", 1), ("thumbnail", 8)):
        if getattr(cfg, name) < low:
            raise PipelineError(f"{name}={getattr(cfg, name)} is too small: it must be at least {low}.")


def run_examples(cfg: ExamplesConfig) -> int:
    _check(cfg)
    store = Store(cfg.store.root)
    store.check_writable()
    image_set = images_lib.open_images(cfg.images.path, limit=cfg.images.limit)
    final, partial = example_tables(store)
    done_keys = set(final.read()["key"].to_pylist())
    batches = plan_batches(store, done_keys, image_set, cfg)
    slices = math.ceil(len(image_set) / cfg.slice_size)
    committed = partial.done()
    tasks = [ExampleTask(batch.part_id(i), batch.model, batch.weights, batch.features,
                         image_set.slice(i * cfg.slice_size, (i + 1) * cfg.slice_size), cfg.k, cfg.batch_size,
                         cfg.thumbnail)
             for batch in batches for i in range(slices) if batch.part_id(i) not in committed]
    features = sum(len(b.keys) for b in batches)
    print(f"examples: {len(done_keys)} visualizations already have examples; {features} features of "
          f"{len(batches)} model(s) to do over {len(image_set)} images in {slices} slice(s): {len(tasks)} units "
          f"to run", flush=True)

    from pipeline.execution.analysis_runner import run_units

    summary = run_units(ExampleWorker, tasks, cfg.cluster, cfg.device, cfg.progress,
                        lambda task, table: partial.write(task.part_id, table))
    finished = 0
    for batch in batches:
        ids = {batch.part_id(i) for i in range(slices)}
        if ids <= partial.done():
            final.write(batch.batch_id, merge(batch, partial.read(ids), cfg.k))
            partial.delete(ids)
            finished += 1
    print(f"done: {summary.done} units run, {summary.failed} failed; {finished}/{len(batches)} models complete\n"
          f"examples: pyarrow.dataset.dataset('{store.root}/examples', format='parquet')", flush=True)
    for failure in summary.failures[:10]:
        print(f"  failed {failure}")
    return EXIT_FAILURES if summary.failed else 0
