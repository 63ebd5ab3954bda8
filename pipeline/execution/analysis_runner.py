"""Run analysis units (dataset examples, probes) on the sweep's Ray machinery.

A unit is one task object; a worker class (kept alive as a Ray actor, so its
models stay loaded) turns it into a pyarrow table, and the driver hands each
finished table to ``commit`` as it arrives, so an interruption loses at most
the units in flight. Distribution, backpressure and retries are the
scheduler's (:func:`pipeline.scheduler.drive`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import ClusterSection, ProgressSection

from pipeline.execution import scheduler
from pipeline.execution.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class UnitSummary:
    done: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    aborted: bool = False


def run_units(worker_class: type, tasks: list[Any], cluster: ClusterSection, device: str, progress: ProgressSection,
              commit: Callable[[Any, Any], None]) -> UnitSummary:
    import ray

    summary = UnitSummary()
    if not tasks:
        return summary
    scheduler.start_ray(cluster)
    gpus = scheduler.gpus_per_worker(cluster)
    workers = min(scheduler.worker_count(cluster, gpus), len(tasks))
    actors = scheduler.make_actors(worker_class, cluster, gpus, workers, device, cluster.model_cache,
                                   max(1, int(cluster.cpus_per_worker)))
    bar = Progress(len(tasks), progress.log_every_s, progress.bar)

    def on_done(task: Any, ref) -> None:
        try:
            table = ray.get(ref)
        except ray.exceptions.RayError as error:
            reason = scheduler.failure_reason(error)
            log.warning("unit %s failed: %s", task.part_id, reason)
            summary.failed += 1
            summary.failures.append(f"{task.part_id}: {reason}")
            return
        commit(task, table)
        summary.done += 1

    def after_wait() -> bool:
        bar.update(done=summary.done, failed=summary.failed)
        summary.aborted = summary.failed > cluster.max_failures
        return summary.aborted

    try:
        scheduler.drive(actors, tasks, lambda actor, task: actor.run.remote(task), on_done,
                        scheduler.in_flight_limit(cluster, len(actors)), after_wait)
    finally:
        bar.close()
    return summary

