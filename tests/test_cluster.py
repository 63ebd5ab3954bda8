"""A Ray cluster that changes under a sweep (nodes lost for good or joining late, workers dying) or lacks GPUs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_resilience import ENV, REPO, assert_exactly

from pipeline.errors import PipelineError
from pipeline.execution import scheduler
from pipeline.execution.plan import build_plan

SWEEP = ["sweep.layers=[0]", "sweep.features=first:24", "optim.steps=4", "optim.copies=1"]

# A head without CPUs and two 1-CPU worker nodes, as `ray start` on a fixed allocation gives; the sweep runs
# in a thread beside the main one, which alone may add and remove Ray's simulated nodes.
CLUSTER = textwrap.dedent("""
    import logging, sys, threading, time
    import pipeline, ray
    from ray.cluster_utils import Cluster
    from pipeline import cli
    from pipeline.execution.driver import run_sweep
    from pipeline.store.store import Store

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("pipeline.execution.scheduler").setLevel(logging.DEBUG)
    root, conf, scenario, *overrides = sys.argv[1:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    first = cluster.add_node(num_cpus=1)
    if scenario == "shrink":
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    cfg = cli.load("sweep",
        "cluster=ray", f"cluster.address={cluster.address}", "cluster.gpus_per_worker=0", "sweep.chunk_size=1",
        "store.commit_every=1", "progress.bar=false", "progress.log_every_s=1", f"store.root={root}", *overrides)

    result = {}
    sweeping = threading.Thread(target=lambda: result.setdefault("code", run_sweep(cfg)))
    sweeping.start()
    while len(Store(root).committed_keys()) < (2 if scenario == "shrink" else 1) and sweeping.is_alive():
        time.sleep(0.1)
    if scenario == "shrink":
        cluster.remove_node(first)  # its worker dies with it, mid-chunk, and no node replaces it
        print("node removed", flush=True)
    else:
        cluster.add_node(num_cpus=1)  # room, at last, for the worker that could not be placed
        print("node added", flush=True)
    sweeping.join()
    print("sweep returned", result.get("code"), flush=True)
    ray.shutdown()
    cluster.shutdown()
    sys.exit(result.get("code", 3))
""")


def run_cluster(tmp_path: Path, scenario: str, *overrides: str, timeout: int) -> tuple[int, str]:
    """The scenario's exit status and output; its whole process group is killed if it outlives ``timeout``."""
    process = subprocess.Popen([sys.executable, "-c", CLUSTER, str(tmp_path / "store"), str(REPO / "conf"),
                                scenario, *SWEEP, *overrides], cwd=tmp_path, env=ENV, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the sweep did not end within {timeout} s:\n{output[-4000:]}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # Ray's processes of the simulated cluster
        except ProcessLookupError:
            pass
    return process.returncode, output


def planned(compose) -> list[str]:
    return build_plan(compose(*SWEEP)).keys()


def test_a_node_lost_for_good_the_sweep_ends_on_the_survivor(compose, tmp_path):
    code, output = run_cluster(tmp_path, "shrink", timeout=240)
    assert code == 0, output[-4000:]
    after = output[output.index("node removed"):]
    assert "workers 1/2" in after, "the progress line shows the live workers"
    assert_exactly(tmp_path / "store", planned(compose))


def test_a_node_that_joins_mid_sweep_gets_work(compose, tmp_path):
    code, output = run_cluster(tmp_path, "join", "optim.steps=30", timeout=240)
    assert code == 0, output[-4000:]
    after = output[output.index("node added"):]
    assert "workers 2/2" in after, "a worker was added for the new node's CPU"
    per_worker = after[after.index("tasks per worker: "):].splitlines()[0]
    assert per_worker.startswith("tasks per worker: 1: ") and ", 2: 0" not in per_worker and ", 2: " in per_worker
    assert_exactly(tmp_path / "store", build_plan(compose(*SWEEP, "optim.steps=30")).keys())


def test_cluster_ray_on_a_cluster_without_gpus_runs_on_cpus_by_default(ray_local, compose):
    cfg = compose("cluster=ray")
    assert cfg.cluster.gpus_per_worker == "auto" and cfg.cluster.gpu_wait_s > 60
    assert scheduler.gpus_per_worker(cfg.cluster) == 0.0


def test_gpus_asked_for_on_a_cluster_without_them_stop_after_gpu_wait_s(ray_local, compose, tmp_path, capsys):
    from pipeline.errors import EXIT_BAD_INPUT, reporting_errors
    from pipeline.execution.driver import run_sweep

    root = tmp_path / "store"
    cfg = compose("cluster=ray", "cluster.gpus_per_worker=1", "cluster.gpu_wait_s=2", "sweep.layers=[0]",
                  "sweep.features=[0]", f"store.root={root}")
    started = time.monotonic()
    assert reporting_errors(lambda: run_sweep(cfg)) == EXIT_BAD_INPUT
    assert 2 <= time.monotonic() - started < 60
    error = capsys.readouterr().err
    assert error.startswith("error: cluster.gpus_per_worker=1 but the Ray cluster has no GPU, and none joined within "
                            "cluster.gpu_wait_s=2 s") and error.strip().count("\n") == 0
    assert "cluster.gpus_per_worker=0" in error and "add GPU nodes" in error
    assert not (root / "plan").exists()
    local = compose("cluster=local", "cluster.gpus_per_worker=1", "cluster.gpu_wait_s=600")
    started = time.monotonic()
    with pytest.raises(PipelineError, match="this machine's Ray has no GPU"):
        scheduler.gpus_per_worker(local.cluster)  # a local Ray gets no new nodes: no wait
    assert time.monotonic() - started < 5


@dataclass(frozen=True)
class Task:
    name: str
    crashes: int  # runs that kill the worker's process before it answers
    marker: str  # counts the runs, across the worker's restarts


class CrashingWorker:
    """Kills its own process on a task's first ``crashes`` runs, as a segfault or the OOM killer would."""

    def __init__(self, *args):
        pass

    def run(self, task: Task) -> str:
        with open(task.marker, "a") as runs:
            runs.write("x")
        with open(task.marker) as runs:
            if len(runs.read()) <= task.crashes:
                os._exit(1)
        return task.name


class BrokenWorker:
    def __init__(self, *args):
        raise RuntimeError("no device here")

    def run(self, task):
        return task.name


class SlowSecondWorker:
    """The second actor to start takes a second longer (it imports more, or shares a core); a task runs until
    that one is up, and a while after, as a chunk outlasts an actor's start. Returns the pid that ran it."""

    directory = ""  # where the actors leave their marks: set by the test, travels with the pickled class

    def __init__(self, *args):
        try:
            os.close(os.open(os.path.join(self.directory, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(1.0)
            Path(self.directory, "second").touch()

    def run(self, task: Task) -> int:
        deadline = time.monotonic() + 30
        while not Path(self.directory, "second").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # for the driver to hear that the second actor is up
        return os.getpid()


def run_pool(ray_local, compose, worker_class, tasks):
    from pipeline.execution.progress import Progress

    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    done, failed = [], []

    def commit(task, result, summary):
        done.append(result)
        summary.done += 1

    def fail(task, reason, attempts, summary):
        failed.append((task.name, reason, attempts))
        summary.failed += 1

    cluster = compose("cluster.workers=2", "cluster.cpus_per_worker=0.5").cluster
    summary = scheduler.run_tasks(worker_class, tasks, cluster, "cpu", Progress(len(tasks), bar=False), commit, fail)
    return summary, done, failed


def test_a_task_whose_worker_dies_runs_again_and_counts_once_and_one_that_always_kills_it_fails(
        ray_local, compose, tmp_path):
    tasks = [Task(f"t{i}", crashes, str(tmp_path / f"t{i}")) for i, crashes in enumerate([0, 1, 0, 0, 99, 0])]
    summary, done, failed = run_pool(ray_local, compose, CrashingWorker, tasks)
    assert sorted(done) == ["t0", "t1", "t2", "t3", "t5"] and summary.done == 5
    assert [(name, attempts) for name, _, attempts in failed] == [("t4", scheduler.TASK_RETRIES + 1)]
    assert failed[0][1].startswith(f"worker lost {scheduler.TASK_RETRIES + 1} times: ")
    # A dying actor can take the reply of the task it finished just before with it; Ray then fails both calls
    # ("may or may not have been executed") and the older is blamed, so a killer may run once more than its
    # counted losses, and an innocent neighbour once more too. Bounded either way: no endless retries.
    killer_runs, crashed_once_runs = ((tmp_path / name).read_text().count("x") for name in ("t4", "t1"))
    assert scheduler.TASK_RETRIES + 1 <= killer_runs <= 2 * (scheduler.TASK_RETRIES + 1)
    assert 2 <= crashed_once_runs <= 2 + scheduler.TASK_RETRIES


def test_workers_that_cannot_start_fail_the_tasks_instead_of_waiting(ray_local, compose, tmp_path):
    tasks = [Task(f"t{i}", 0, str(tmp_path / f"t{i}")) for i in range(3)]
    summary, done, failed = run_pool(ray_local, compose, BrokenWorker, tasks)
    assert not done and summary.failed == 3
    assert {reason for _, reason, _ in failed} == {
        "no worker could run it: the worker could not start: RuntimeError: no device here"}


def test_a_short_queue_is_shared_with_a_worker_still_starting(ray_local, compose, tmp_path, monkeypatch):
    """Two chunks, two workers, one slower to start: the first one up runs one chunk, not both."""
    monkeypatch.setattr(SlowSecondWorker, "directory", str(tmp_path))
    tasks = [Task(f"t{i}", 0, str(tmp_path / f"t{i}")) for i in range(2)]
    summary, done, failed = run_pool(ray_local, compose, SlowSecondWorker, tasks)
    assert summary.done == 2 and not failed
    assert len(set(done)) == 2, f"both chunks ran in one worker (pid {done[0]}) while the other was starting"


class SleepingWorker:
    """Runs a task named ``long`` for 3 s, any other at once."""

    def __init__(self, *args):
        pass

    def run(self, task: Task) -> str:
        time.sleep(3.0 if task.name == "long" else 0.0)
        return task.name


def test_a_worker_given_a_task_before_the_queue_counts_as_live_while_it_runs_it(ray_local, compose, tmp_path):
    """A sweep's ``first`` sends each non-calibrating worker a chunk before the queue starts: that worker is
    up (it answers its ping before the chunk, calls being answered in order) and counted live meanwhile."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    committed, live_before_long = [], []

    class Recording:
        def update(self, done, failed, workers):
            if "long" not in committed:
                live_before_long.append(workers[0])

    def first(handles, size):
        long = Task("long", 0, str(tmp_path / "long"))
        return [Task(f"t{i}", 0, str(tmp_path / f"t{i}")) for i in range(3)], [(1, long, handles[1].run.remote(long))]

    def commit(task, result, summary):
        committed.append(result)
        summary.done += 1

    cluster = compose("cluster.workers=2", "cluster.cpus_per_worker=0.5").cluster
    tasks = [Task("placeholder", 0, "")] * 4  # sizes the pool: two workers
    summary = scheduler.run_tasks(SleepingWorker, tasks, cluster, "cpu", Recording(), commit,
                                  lambda *args: pytest.fail("nothing fails here"), first=first)
    assert summary.done == 4 and sorted(committed) == ["long", "t0", "t1", "t2"]
    assert 2 in live_before_long, f"while it ran its first task the worker did not count as live: {live_before_long}"
