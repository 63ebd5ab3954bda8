"""Dataset examples: the dataset images that most excite each visualized feature.

    vit-atlas examples store.root=DIR images.path=PATH [k=9] [images.limit=N] [cluster=ray]

For every unit visualized in the store with the ``mean`` objective (a channel of any target: mlp, keys,
queries, values, attn_out, residual; or a row of a ``target.directions`` file, scored as the sweep scored it:
the projection per token, an SAE latent's pre-activation), the top-k images of ``images.path`` by that
unit's patch-mean activation, with the activation map over the patch grid and a thumbnail, land in
``ROOT/examples/part-*.parquet`` under the visualization's key (schemas.EXAMPLES),
for the atlas to show beside the visualization.

Work is planned per (model, weights): one *batch* holds every unit that model
still needs, and its work units are slices of the image set; a worker computes all
the batch's units for its slice in one pass. Each finished slice is committed
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
from pipeline.analysis.example_worker import MLP_CHANNEL, ExampleTask, ExampleWorker, Unit, UnitKind
from pipeline.store.schemas import EXAMPLE_SLICES, EXAMPLES
from pipeline.store.store import PartTable, Store

EXIT_FAILURES = 1

@dataclass(frozen=True)
class Batch:
    """One (model, weights): the units still needing examples, and which keys each one serves."""

    batch_id: str
    model: str
    weights: weights_lib.WeightsChoice
    keys: dict[Unit, tuple[str, ...]]  # unit -> visualization keys

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(sorted(self.keys))

    def part_id(self, slice_index: int) -> str:
        return f"{self.batch_id}-{slice_index:06d}"


def _unit_kind(target: str, config: dict) -> UnitKind:
    directions = config.get("directions")
    return UnitKind(target, directions["sha256"], directions["path"]) if directions else UnitKind(target)


def _identity(units: list[Unit]) -> list:
    """What the batch id takes of its units: MLP channels as [layer, feature], as before other kinds were
    ranked (an MLP-only batch keeps its id, so its examples are not recomputed), then any other units with
    their target and directions sha256 (never the file's path, as in the sweep's config hash)."""
    channels = [[u.layer, u.feature] for u in units if u.kind == MLP_CHANNEL]
    others = [[u.layer, u.feature, u.kind.target, u.kind.directions_sha256] for u in units if u.kind != MLP_CHANNEL]
    return [channels, others] if others else [channels]
def example_tables(store: Store) -> tuple[PartTable, PartTable]:
    return store.table(EXAMPLES), store.table(EXAMPLE_SLICES)


def plan_batches(store: Store, done_keys: set[str], image_set: images_lib.ImageSet, cfg: ExamplesConfig) -> list[Batch]:
    """Batches for the store's mean-objective visualizations, of every unit kind, that have no examples yet."""
    table = store.read_records(
        columns=["key", "model", "weights", "target", "layer", "feature", "config", "image_size"],
        filter=ds.field("objective") == "mean")
    table = table.filter(pc.invert(pc.is_in(table["key"], value_set=pa.array(sorted(done_keys), pa.string()))))
    grouped: dict[tuple[str, str, int], dict[Unit, list[str]]] = {}
    configs: dict[tuple[str, str, int], str] = {}
    for row in table.to_pylist():
        group = (row["model"], row["weights"], row["image_size"])
        unit = Unit(row["layer"], row["feature"], _unit_kind(row["target"], json.loads(row["config"])))
        grouped.setdefault(group, {}).setdefault(unit, []).append(row["key"])
        configs[group] = row["config"]
    batches = []
    for (model, weights_id, image_size), keys in sorted(grouped.items()):
        choice = weights_lib.choice_of_record(model, weights_id, json.loads(configs[(model, weights_id, image_size)])
                                              .get("weights", ""), image_size, cfg.weights)
        identity = json.dumps([model, weights_id, image_size, *_identity(sorted(keys)), image_set.fingerprint(),
                               cfg.k, cfg.slice_size, cfg.thumbnail])
        batch_id = hashlib.sha256(identity.encode()).hexdigest()[:16]
        batches.append(Batch(batch_id, model, choice, {u: tuple(sorted(k)) for u, k in keys.items()}))
    return batches


def merge(batch: Batch, partial: pa.Table, k: int) -> pa.Table:
    """The batch's top-k per unit over all slices, one row set per visualization key."""
    units = {(u.layer, u.feature, u.kind.name): u for u in batch.keys}
    by_unit: dict[Unit, list[dict]] = {}
    for row in partial.to_pylist():
        by_unit.setdefault(units[row["layer"], row["feature"], row["kind"]], []).append(row)
    out = []
    for unit, candidates in sorted(by_unit.items()):
        candidates.sort(key=lambda r: (-r["activation"], r["image_id"]))  # ties broken by id: deterministic
        for rank, row in enumerate(candidates[:k]):
            for key in batch.keys[unit]:
                out.append({"key": key, "rank": rank, "image_id": row["image_id"], "activation": row["activation"],
                            "thumbnail": row["thumbnail"], "activation_map": row["activation_map"],
                            "grid_rows": row["grid_rows"], "grid_cols": row["grid_cols"]})
    return pa.Table.from_pylist(out, schema=EXAMPLES.schema)


def _check(cfg: ExamplesConfig) -> None:
    for name, low in (("k", 1), ("slice_size", 1), ("batch_size", 1), ("thumbnail", 8)):
        if getattr(cfg, name) < low:
            raise PipelineError(f"{name}={getattr(cfg, name)} is too small: it must be at least {low}.")


def run_examples(cfg: ExamplesConfig) -> int:
    _check(cfg)
    store = Store(cfg.store.root)
    store.check_writable()
    store.recover()
    image_set = images_lib.open_images(cfg.images.path, limit=cfg.images.limit)
    with store.lease("examples"):  # merging deletes slices: two jobs at once would lose each other's
        return _run_examples(store, image_set, cfg)


def _run_examples(store: Store, image_set: images_lib.ImageSet, cfg: ExamplesConfig) -> int:
    final, partial = example_tables(store)
    done_keys = set(final.read()["key"].to_pylist())
    # A job killed between writing a model's merged part and deleting its slices left them behind.
    partial.delete({part for part in partial.done() if part.rpartition("-")[0] in final.done()})
    batches = plan_batches(store, done_keys, image_set, cfg)
    slices = math.ceil(len(image_set) / cfg.slice_size)
    committed = partial.done()
    tasks = [ExampleTask(batch.part_id(i), batch.model, batch.weights, batch.units,
                         image_set.slice(i * cfg.slice_size, (i + 1) * cfg.slice_size), cfg.k, cfg.batch_size,
                         cfg.thumbnail)
             for batch in batches for i in range(slices) if batch.part_id(i) not in committed]
    units = sum(len(b.keys) for b in batches)
    print(f"examples: {len(done_keys)} visualizations already have examples; {units} units of "
          f"{len(batches)} model(s) to do over {len(image_set)} images in {slices} slice(s): {len(tasks)} units "
          f"to run", flush=True)

    from pipeline.execution.scheduler import run_part_tasks

    summary = run_part_tasks(ExampleWorker, tasks, partial, cfg.cluster, cfg.device, cfg.progress)
    finished = 0
    for batch in batches:
        ids = {batch.part_id(i) for i in range(slices)}
        if ids <= partial.done():
            final.write(batch.batch_id, merge(batch, partial.read(ids), cfg.k))
            partial.delete(ids)
            finished += 1
    print(f"done: {summary.done} units run, {summary.failed} failed; {finished}/{len(batches)} models complete\n"
          f"examples: pyarrow.dataset.dataset('{store.root}/examples', format='parquet')", flush=True)
    for part_id, reason in summary.failures[:10]:
        print(f"  failed {part_id}: {reason}")
    return EXIT_FAILURES if summary.failed else 0
