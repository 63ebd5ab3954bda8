"""Interruptions and failures: kill -9 of the driver, node loss, NaN, out of memory, too many failures."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
import webdataset

from pipeline.engine import calibrate
from pipeline.execution import scheduler
from pipeline.execution import worker
from pipeline.engine.optimize import Visualization
from pipeline.execution.plan import build_plan
from pipeline.execution.progress import Progress
from pipeline.store.store import Store
from synthetic_store import measured

REPO = Path(__file__).resolve().parents[1]
# PYTHONPATH: subprocesses run from tmp_path import this checkout, not whichever one the venv was installed from.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def committed(root: Path) -> int:
    return len(glob.glob(str(root / "parquet" / "*" / "part-*.parquet")))


def assert_exactly(root: Path, planned: list[str]) -> None:
    keys = ds.dataset(str(root / "parquet"), format="parquet", partitioning="hive").to_table(columns=["key"])
    assert sorted(keys.column("key").to_pylist()) == sorted(planned)
    shards = sorted(glob.glob(str(root / "webdataset" / "*.tar")))
    for shard in shards:  # every shard is a complete tar
        with tarfile.open(shard) as archive:
            archive.getmembers()
    samples = [s["__key__"] for s in webdataset.WebDataset(shards, shardshuffle=False)]
    assert sorted(samples) == sorted(planned)
    visible = [p for p in glob.glob(str(root / "**" / "*"), recursive=True) if "tmp" in Path(p).name]
    assert not visible, f"temporaries visible to readers: {visible}"


# kill -9 of a committing process is in `make test` through tests/test_store.py (the writer killed at each
# commit step) and tests/test_s3.py (a sweep into S3 killed after its first commit); here it is `slow`.
@pytest.mark.parametrize("signal_number,exit_code", [
    pytest.param(signal.SIGKILL, -signal.SIGKILL, id="kill-9", marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, 130, id="ctrl-c")])
def test_an_interrupted_driver_then_the_same_command_gives_exactly_the_planned_keys(compose, tmp_path,
                                                                                     signal_number, exit_code):
    root = tmp_path / "store"
    args = ["sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[0]", "sweep.features=first:8",
            "sweep.chunk_size=1", "optim.steps=30", "optim.copies=1", "store.commit_every=1",
            "progress.bar=false", f"store.root={root}"]
    planned = build_plan(compose(*args)).keys()
    command = [sys.executable, "-m", "pipeline", "sweep", *args]
    # A child inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt for it: something
    # earlier in a full test session leaves SIGINT ignored in pytest, so the driver gets it back as a shell gives it.
    driver = subprocess.Popen(command, cwd=tmp_path, env=ENV, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # Interrupted at its first commit: on a quiet machine the last units of 8 take only seconds, and
        # a signal reaches Python only between Ray calls, so a later interrupt could find the sweep done.
        while committed(root) < 1 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None, "the sweep finished before it could be killed; give it more work"
        os.kill(driver.pid, signal_number)
        assert driver.wait(timeout=120) == exit_code
        done_at_kill = committed(root)
        assert 0 < done_at_kill < len(planned)
        again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the killed driver's own Ray processes
        except ProcessLookupError:
            pass
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"plan: {len(planned)} planned / {done_at_kill} already done" in again.stdout
    assert_exactly(root, planned)


NODE_LOSS = textwrap.dedent("""
    import os, sys, threading, time
    import pipeline, ray
    from ray.cluster_utils import Cluster
    from pipeline import cli
    from pipeline.execution.driver import run_sweep
    from pipeline.store.store import Store

    root = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    cfg = cli.load("sweep",
        "cluster=ray", f"cluster.address={cluster.address}", "cluster.workers=2", "cluster.gpus_per_worker=0",
        "sweep.layers=[0]", "sweep.features=first:10", "sweep.chunk_size=1", "optim.steps=40",
        "optim.copies=1", "store.commit_every=1", "progress.bar=false", f"store.root={root}")

    # Ray's Cluster adds nodes only from the main thread, so the sweep runs beside it.
    result = {}
    sweeping = threading.Thread(target=lambda: result.setdefault("code", run_sweep(cfg)))
    sweeping.start()
    while len(Store(root).committed_keys()) < 2 and sweeping.is_alive():
        time.sleep(0.1)
    cluster.remove_node(doomed)  # its worker dies with it, mid-chunk
    print("node removed", flush=True)
    cluster.add_node(num_cpus=1)  # the replacement an autoscaler would bring
    sweeping.join()
    ray.shutdown()
    cluster.shutdown()
    sys.exit(result.get("code", 3))
""")


# `make test-all` only: tests/test_cluster.py runs the harder cases in `make test` (a node lost for good, a node
# that joins mid-sweep), and make test has to stay within CI's 15 minutes.
@pytest.mark.slow
def test_losing_a_node_mid_sweep_still_ends_with_exactly_the_planned_keys(compose, tmp_path):
    root = tmp_path / "store"
    planned = build_plan(compose("sweep.layers=[0]", "sweep.features=first:10", "optim.steps=40",
                                 "optim.copies=1")).keys()
    result = subprocess.run([sys.executable, "-c", NODE_LOSS, str(root)], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "node removed" in result.stdout
    assert_exactly(root, planned)


class FakeVisualizer:
    """Stands in for a model: images are the feature index, NaN where told, OOM above a batch size."""

    image_size = (8, 8)

    def __init__(self, nan_attempts: dict[int, int], max_batch: int = 99):
        self.nan_attempts = nan_attempts  # feature -> attempts that come out NaN
        self.max_batch = max_batch
        self.calls: list[list[int]] = []
        self.attempt: dict[int, int] = {}

    def precision(self, requested, layer, target, objective, optim=None, directions=None):
        """What ``auto`` resolves to here: fp32, as measured on an AVX2 CPU."""
        used = "fp32" if requested == "auto" else requested
        return calibrate.PrecisionChoice(requested, used, "bf16", 58.0, 1.2, "GFLOP/s (matmul probe)")

    def run(self, layer, target, objective, features, seeds, config, directions=None):
        self.calls.append(list(features))
        if len(features) > self.max_batch:
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        finite = []
        for f in features:
            self.attempt[f] = self.attempt.get(f, -1) + 1
            finite.append(self.attempt[f] >= self.nan_attempts.get(f, 0))
        images = torch.stack([torch.full((3, 8, 8), f / 100) for f in features])
        activations = torch.tensor([float(f) for f in features])
        return Visualization(images, activations, torch.zeros(len(features), 2),
                             torch.stack([torch.zeros(len(features)), activations], dim=1), torch.tensor(finite))


def chunk_of(compose, features: str):
    return build_plan(compose("sweep.layers=[0]", f"sweep.features={features}", "optim.steps=2")).chunks(set(), 99)[0]


@pytest.fixture
def no_measures(monkeypatch):
    """The fake model has no layers to measure the records with; these tests are about the optimization."""
    monkeypatch.setattr(worker, "measure", lambda _viz, _layer, _target, _objective, features, pngs, _precision, _directions=None:
                        [measured(png, 0.0, feature) for feature, png in zip(features, pngs)])


def test_nan_is_retried_once_on_another_stream_then_recorded_as_failed(compose, no_measures):
    chunk = chunk_of(compose, "[1,2,3]")
    fake = FakeVisualizer(nan_attempts={2: 1, 3: 5})
    runner = worker.VisualizationWorker("cpu")
    runner.visualizer = lambda _chunk: fake
    result = runner.run(chunk)
    assert sorted(result.records.table["feature"].to_pylist()) == [1, 2]
    assert [(u["feature"], attempts) for u, _, attempts in result.failures] == [(3, 2)]
    assert "not finite" in result.failures[0][1]
    assert fake.calls == [[1, 2, 3], [2, 3]]


def test_out_of_memory_halves_the_chunk_until_it_fits(compose, no_measures):
    chunk = chunk_of(compose, "first:8")
    fake = FakeVisualizer(nan_attempts={}, max_batch=2)
    runner = worker.VisualizationWorker("cpu")
    runner.visualizer = lambda _chunk: fake
    result = runner.run(chunk)
    assert sorted(result.records.table["feature"].to_pylist()) == list(range(8)) and not result.failures
    assert fake.calls == [list(range(8)), [0, 1, 2, 3], [0, 1], [2, 3], [4, 5, 6, 7], [4, 5], [6, 7]]


class AlwaysFailingWorker:
    def __init__(self, *args):
        pass

    def run(self, chunk):
        raise RuntimeError("fake worker failure")


def test_past_max_failures_the_run_stops_and_says_why(ray_local, compose, tmp_path, monkeypatch):
    cfg = compose("sweep.layers=[0,1,2,3]", "sweep.features=first:4", "sweep.chunk_size=1",
                  "cluster.max_failures=3", f"store.root={tmp_path}")
    plan = build_plan(cfg)
    monkeypatch.setattr(scheduler, "VisualizationWorker", AlwaysFailingWorker)
    # Ray's workers cannot import this test module; ship the fake worker's code with it.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    store = Store(str(tmp_path))
    with store.writer(1, 60) as writer:
        summary = scheduler.run_plan(plan, set(), 1, cfg.cluster, writer, Progress(len(plan), bar=False), "cpu")
    assert summary.aborted and 3 < summary.failed < len(plan)
    assert all("fake worker failure" in reason for _, reason in summary.failures)
    assert store.failed_keys() == {key for key, _ in summary.failures}
