"""Measure the records of an older store without re-optimizing: every record schema v1 part becomes this version's.

    vit-atlas describe store.root=DIR [weights=PATH] [device=auto]

A v1 record has its image but not what pipeline.engine.measures measures on it
(descriptors, the noise and grey baselines, the early-layer embedding). This job
loads each record's model with the record's own weights (``choice_of_record``),
measures the records from their stored PNGs exactly as the worker does, and
replaces each v1 part by a part of this version's schema holding the same records through
the store's rewrite protocol (``Store.rewrite_part``: stage, commit, roll forward), under
the store's records lease, so no sweep commits beside it. Each part is done
whole or not at all: an interrupted run leaves every part either v1 (redone by
the next run) or rewritten, and every key committed once; a second run finds no v1
part and does nothing. The activation curve (v3) stays null in a rewritten part, and a v2
part is left as it is: the curve is measured during the optimization, which this job does not re-run.
"""

from __future__ import annotations

import json
import time

from pipeline.config import DescribeConfig
from pipeline.engine.measures import measure
from pipeline.engine.objectives import parse_objective
from pipeline.errors import PipelineError
from pipeline.execution.worker import ModelWorker
from pipeline.models import weights as weights_lib
from pipeline.store.schemas import SCHEMA_ID, UNMEASURED_SCHEMA_IDS
from pipeline.store.store import Store

# Records of one (model, weights, size, layer, target, objective, precision) measured in one batch.
_GROUP = ("model", "weights", "image_size", "layer", "target", "objective", "precision")


def run_describe(cfg: DescribeConfig) -> int:
    if cfg.batch_size < 1:
        raise PipelineError(f"batch_size={cfg.batch_size} is too small: it must be at least 1 (records measured "
                            "in one forward pass).")
    store = Store.existing(cfg.store.root)
    older(store)  # a foreign part stops the job here, before the lease or anything else is written
    store.check_writable()
    with store.lease():  # rewriting record parts: no sweep may commit beside it
        parts = older(store)
        if not parts:
            print(f"describe: every part of {store.root} is measured already; nothing to do", flush=True)
            return 0
        print(f"describe: {len(parts)} part(s) of {store.root} to measure and rewrite as {SCHEMA_ID}", flush=True)
        models = ModelWorker(cfg.device, model_cache=2)
        records = 0
        for number, path in enumerate(parts, 1):
            started = time.perf_counter()
            rows = store.read_part(path).to_pylist()
            store.rewrite_part(path, measured(rows, models, cfg))
            records += len(rows)
            print(f"  part {number}/{len(parts)}: {len(rows)} records in {time.perf_counter() - started:.1f} s",
                  flush=True)
    print(f"describe: {records} records measured; the store's parts are all measured", flush=True)
    return 0


def older(store: Store) -> list[str]:
    """Paths of the parts written with a record schema that lacks the measured columns."""
    return [path for path, version in store.versions().items() if version in UNMEASURED_SCHEMA_IDS]


def measured(rows: list[dict], models: ModelWorker, cfg: DescribeConfig) -> list[dict]:
    """``rows`` (one part's records) with their measured columns, in the same order."""
    from pipeline.engine.visualizer import Visualizer

    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(tuple(row[name] for name in _GROUP), []).append(index)
    out = list(rows)
    for (model, weights_id, image_size, layer, target, objective, precision), indices in groups.items():
        recorded = json.loads(rows[indices[0]]["config"]).get("weights", "")
        choice = weights_lib.choice_of_record(model, weights_id, recorded, image_size, cfg.weights)
        visualizer = models.cached((model, choice), lambda: Visualizer(model, choice, models.device))
        for start in range(0, len(indices), cfg.batch_size):
            batch = indices[start:start + cfg.batch_size]
            values = measure(visualizer, layer, target, parse_objective(objective), [rows[i]["feature"] for i in batch],
                             [rows[i]["png"] for i in batch], precision)
            for i, value in zip(batch, values):
                out[i] = {**rows[i], **value}
    return out
