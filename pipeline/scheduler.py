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

import ray
from omegaconf import DictConfig

from pipeline.errors import PipelineError
from pipeline.plan import Chunk, Plan
from pipeline.progress import Progress
from pipeline.worker import VisualizationWorker

log = logging.getLogger(__name__)

TASK_RETRIES = 3


@dataclass
class RunSummary:
    done: int = 0
    failed: int = 0
    duplicates: int = 0
    busy_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    aborted: bool = False


def start_ray(cluster: DictConfig) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cluster.kind == "local":
        # Workers must import this package the way the driver does; a local Ray shares the interpreter.
        ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
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


def gpus_per_worker(cluster: DictConfig) -> float:
    if cluster.gpus_per_worker == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    return float(cluster.gpus_per_worker)


def worker_count(cluster: DictConfig, gpus: float) -> int:
    if cluster.workers != "auto":
        return max(1, int(cluster.workers))
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) / gpus))
    return max(1, int(resources.get("CPU", 1) / max(cluster.cpus_per_worker, 1e-3)))


def run_plan(plan: Plan, done: set[str], chunk_size: int, cluster: DictConfig, writer, progress: Progress,
             device: str) -> RunSummary:
    """Run the plan's missing units on Ray actors, stream results into ``writer``.

    Chunks are at most ``chunk_size`` features, and smaller when that keeps every
    worker busy (a small sweep on many workers). Stops past ``cluster.max_failures``.
    """
    summary = RunSummary()
    gpus = gpus_per_worker(cluster)
    workers = worker_count(cluster, gpus)
    todo = len(plan) - len(done)
    chunks = plan.chunks(done, min(chunk_size, max(1, math.ceil(todo / workers))))
    if not chunks:
        return summary
    count = min(workers, len(chunks))
    actor_class = ray.remote(VisualizationWorker).options(
        num_cpus=cluster.cpus_per_worker, num_gpus=gpus,
        max_restarts=-1, max_task_retries=TASK_RETRIES,
    )
    threads = max(1, int(cluster.cpus_per_worker))
    actors = [actor_class.remote(device, cluster.model_cache, threads) for _ in range(count)]
    limit = 2 * count if cluster.max_in_flight == "auto" else max(1, int(cluster.max_in_flight))
    queue = deque(chunks)
    in_flight: dict[ray.ObjectRef, tuple[Chunk, int]] = {}
    load = [0] * count
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                actor = min(range(count), key=load.__getitem__)
                chunk = queue.popleft()
                in_flight[actors[actor].run.remote(chunk)] = (chunk, actor)
                load[actor] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                chunk, actor = in_flight.pop(ref)
                load[actor] -= 1
                _collect(ref, chunk, writer, summary)
            writer.maybe_commit()
            progress.update(done=summary.done, failed=summary.failed)
            if summary.failed > cluster.max_failures:
                summary.aborted = True
                break
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        for actor in actors:
            ray.kill(actor)
    return summary


def _collect(ref: ray.ObjectRef, chunk: Chunk, writer, summary: RunSummary) -> None:
    try:
        result = ray.get(ref)
    except (ray.exceptions.RayError, PipelineError) as error:
        reason = f"worker error after {TASK_RETRIES} retries: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        log.warning("chunk %s layer %d features %s failed: %s", chunk.group.model, chunk.group.layer,
                    list(chunk.features), reason)
        for unit in chunk.units():
            writer.add_failure(unit, reason, TASK_RETRIES + 1)
            summary.failed += 1
            summary.failures.append((unit["key"], reason))
        return
    summary.busy_s += result.busy_s
    for record in result.records:
        if writer.add(record):
            summary.done += 1
        else:
            summary.duplicates += 1
    for unit, reason, attempts in result.failures:
        writer.add_failure(unit, reason, attempts)
        summary.failed += 1
        summary.failures.append((unit["key"], reason))
