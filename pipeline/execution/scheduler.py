"""Ray scheduling: actors that keep models loaded, a bounded number of chunks in flight.

The driver is the only writer of the store: chunks go out to
:class:`~pipeline.worker.VisualizationWorker` actors, results come back as they
finish (``ray.wait``) and are handed to the store writer, which drops late
duplicates. At most ``max_in_flight`` chunks are outstanding at any time, so a
plan of a million units never floods the object store.

Crashed workers and lost nodes are Ray's to handle: actors restart
(``max_restarts=-1``) and their method calls are retried
(``max_task_retries``); a chunk that still fails is reported as failed units.
The same code runs on a laptop (``cluster.kind=local`` starts a Ray sized to the
machine) and on a cluster (``cluster.kind=ray`` joins RAY_ADDRESS).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import ray

from pipeline.config import ClusterSection, ProgressSection
from pipeline.errors import PipelineError
from pipeline.execution.plan import Chunk, Plan
from pipeline.execution.progress import Progress
from pipeline.execution.worker import VisualizationWorker

log = logging.getLogger(__name__)

TASK_RETRIES = 3
T = TypeVar("T")


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    duplicates: int = 0
    busy_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (unit key or part id, reason)
    aborted: bool = False


def start_ray(cluster: ClusterSection) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cluster.kind == "local":
        # Workers must import this package the way the driver does; a local Ray shares the interpreter.
        # address="local" starts a new Ray even when another one runs on this machine: without it,
        # ray.init() joins the latest running cluster (another user's sweep or test run).
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    elif cluster.kind == "ray":
        address = cluster.address or os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as error:
            raise PipelineError(
                f"Could not join the Ray cluster at '{address}' ({error}). Start one (`ray start --head`), "
                f"set RAY_ADDRESS or cluster.address, or run with cluster=local."
            ) from None
    else:
        raise PipelineError(f"cluster.kind='{cluster.kind}' is not one of local, ray.")


def gpus_per_worker(cluster: ClusterSection) -> float:
    """The GPUs each worker asks for; a local Ray without GPUs cannot satisfy a request for them."""
    if cluster.gpus_per_worker == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    gpus = float(cluster.gpus_per_worker)
    if gpus and not ray.cluster_resources().get("GPU"):
        message = (f"cluster.gpus_per_worker={gpus} but the Ray cluster has no GPU: workers would wait forever. "
                   f"Set cluster.gpus_per_worker=0 to run on CPUs, or add GPU nodes.")
        if cluster.kind == "local":
            raise PipelineError(message)
        log.warning("%s (waiting, in case an autoscaler adds GPU nodes)", message)
    return gpus


def worker_count(cluster: ClusterSection, gpus: float) -> int:
    if cluster.workers != "auto":
        return max(1, int(cluster.workers))
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) / gpus))
    return max(1, int(resources.get("CPU", 1) / max(cluster.cpus_per_worker, 1e-3)))


def make_actors(worker_class: type, cluster: ClusterSection, gpus: float, count: int, *args) -> list:
    """``count`` actors of ``worker_class``; Ray restarts them and retries their calls when they die."""
    actor_class = ray.remote(worker_class).options(
        num_cpus=cluster.cpus_per_worker, num_gpus=gpus,
        max_restarts=-1, max_task_retries=TASK_RETRIES,
    )
    return [actor_class.remote(*args) for _ in range(count)]


def in_flight_limit(cluster: ClusterSection, actors: int) -> int:
    return 2 * actors if cluster.max_in_flight == "auto" else max(1, int(cluster.max_in_flight))


def drive(actors: list, tasks: Iterable[T], submit: Callable[[Any, T], ray.ObjectRef],
          on_done: Callable[[T, ray.ObjectRef], None], limit: int, after_wait: Callable[[], bool]) -> None:
    """Run ``tasks`` over ``actors`` with at most ``limit`` in flight, least-loaded actor first.

    ``on_done`` gets each finished task with its result reference (``ray.get`` it,
    errors included) in completion order; ``after_wait`` runs after every wait
    (at least once a second) and returns True to stop early. The actors are killed,
    and with them any outstanding call, however this returns.
    """
    queue = deque(tasks)
    in_flight: dict[ray.ObjectRef, tuple[T, int]] = {}
    load = [0] * len(actors)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                actor = min(range(len(actors)), key=load.__getitem__)
                task = queue.popleft()
                in_flight[submit(actors[actor], task)] = (task, actor)
                load[actor] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                task, actor = in_flight.pop(ref)
                load[actor] -= 1
                on_done(task, ref)
            if after_wait():
                break
    finally:
        for actor in actors:  # ends the actor's outstanding calls too (actor tasks cannot be force-cancelled)
            ray.kill(actor)


def run_tasks(worker_class: type, tasks: list[T], cluster: ClusterSection, device: str, progress: Progress,
              commit: Callable[[T, Any, RunSummary], None], fail: Callable[[T, str, int, RunSummary], None],
              tick: Callable[[], None] = lambda: None) -> RunSummary:
    """Run ``tasks`` on actors of ``worker_class`` (``run(task) -> result``): the one task pool.

    Every job (sweep chunks, dataset-example slices, probe slices) runs through here:
    ``commit`` takes each finished task's result in completion order, ``fail`` each task
    that failed with its one-line reason and attempts; both count into the summary.
    ``tick`` runs after every wait (at least once a second). Stops past
    ``cluster.max_failures`` failed units.
    """
    summary = RunSummary()
    if not tasks:
        return summary
    start_ray(cluster)
    gpus = gpus_per_worker(cluster)
    actors = make_actors(worker_class, cluster, gpus, min(worker_count(cluster, gpus), len(tasks)), device,
                         cluster.model_cache, max(1, int(cluster.cpus_per_worker)))

    def on_done(task: T, ref: ray.ObjectRef) -> None:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as error:
            reason = failure_reason(error)
            log.warning("%s failed: %s", task.name, reason)
            fail(task, reason, 1 if isinstance(error, ray.exceptions.RayTaskError) else TASK_RETRIES + 1, summary)
            return
        commit(task, result, summary)

    def after_wait() -> bool:
        tick()
        progress.update(done=summary.done, failed=summary.failed)
        summary.aborted = summary.failed > cluster.max_failures
        return summary.aborted

    drive(actors, tasks, lambda actor, task: actor.run.remote(task), on_done, in_flight_limit(cluster, len(actors)),
          after_wait)
    return summary


def run_plan(plan: Plan, done: set[str], chunk_size: int, cluster: ClusterSection, writer, progress: Progress,
             device: str) -> RunSummary:
    """Run the plan's missing units on Ray actors, stream results into ``writer``.

    Chunks are at most ``chunk_size`` features, and smaller when that keeps every
    worker busy (a small sweep on many workers).
    """
    start_ray(cluster)
    workers = worker_count(cluster, gpus_per_worker(cluster))
    todo = len(plan) - len(done)
    chunks = plan.chunks(done, min(chunk_size, max(1, math.ceil(todo / workers))))

    def commit(chunk: Chunk, result, summary: RunSummary) -> None:
        summary.busy_s += result.busy_s
        for record in result.records:
            if writer.add(record):
                summary.done += 1
            else:
                summary.duplicates += 1
        for unit, reason, attempts in result.failures:
            _fail_unit(unit, reason, attempts, summary)

    def _fail_unit(unit: dict, reason: str, attempts: int, summary: RunSummary) -> None:
        writer.add_failure(unit, reason, attempts)
        summary.failed += 1
        summary.failures.append((unit["key"], reason))

    def fail(chunk: Chunk, reason: str, attempts: int, summary: RunSummary) -> None:
        for unit in chunk.units():
            _fail_unit(unit, reason, attempts, summary)

    return run_tasks(VisualizationWorker, chunks, cluster, device, progress, commit, fail, writer.maybe_commit)


def run_part_tasks(worker_class: type, tasks: list, parts, cluster: ClusterSection, device: str,
                   progress: ProgressSection) -> RunSummary:
    """Analysis jobs: each task's result is one part of a part table, committed as it arrives, so an
    interruption loses at most the tasks in flight and a re-run skips the parts present."""

    def commit(task, table, summary: RunSummary) -> None:
        parts.write(task.part_id, table)
        summary.done += 1

    def fail(task, reason: str, _attempts: int, summary: RunSummary) -> None:
        summary.failed += 1
        summary.failures.append((task.part_id, reason))

    bar = Progress(len(tasks), progress.log_every_s, progress.bar)
    try:
        return run_tasks(worker_class, tasks, cluster, device, bar, commit, fail)
    finally:
        bar.close()


def failure_reason(error: ray.exceptions.RayError) -> str:
    """One line: the worker's own exception, or how Ray lost the worker after its retries."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        cause = error.cause
        return f"worker raised {type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
    first_line = str(error).splitlines()[0][:300] if str(error) else ""
    return f"worker lost after {TASK_RETRIES} retries: {type(error).__name__}: {first_line}"
