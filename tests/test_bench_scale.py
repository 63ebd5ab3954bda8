"""bench/scale.py's stand-in worker makes records the store accepts, through the real scheduler: the
zoo-scale benchmark cannot silently rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyarrow.compute as pc

from pipeline.execution import scheduler
from pipeline.execution.plan import build_plan
from pipeline.execution.progress import Progress
from pipeline.store.schemas import MEASURED_COLUMNS, RECORD_SCHEMA
from pipeline.store.store import Store

_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_simulated_records_go_through_the_scheduler_into_the_store(ray_local, tmp_path):
    bench = _bench_scale()
    ray_local.cloudpickle.register_pickle_by_value(sys.modules["bench_scale"])  # Ray's workers cannot import it
    cfg = bench.sweep_config(20, str(tmp_path), 2, 0, "store.commit_every=8")
    plan = build_plan(cfg)
    store = Store(str(tmp_path))
    with store.writer(cfg.store.commit_every, cfg.store.commit_seconds) as writer:
        summary = scheduler.run_plan(plan, set(), 4, cfg.cluster, writer, Progress(len(plan), bar=False), "cpu",
                                     bench.SimulatedWorker)
    assert 20 <= len(plan) < 40 and summary.done == len(plan) and not summary.failed
    assert store.committed_keys() == set(plan.keys())
    assert store.verify().ok
    table = store.read_records()
    assert table.schema.names == RECORD_SCHEMA.names
    for name in MEASURED_COLUMNS:
        assert table[name].null_count == 0, name
    sizes = pc.binary_length(table["png"])
    assert 80_000 < pc.min(sizes).as_py() and pc.max(sizes).as_py() < 200_000  # a 224 px visualization's PNG
    assert set(table["image_size"].to_pylist()) == {224}
