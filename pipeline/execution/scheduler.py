"""Ray scheduling: a pool of actors that keep models loaded, the queue of work in the driver.

The driver is the only writer of the store: chunks go out to
:class:`~pipeline.execution.worker.VisualizationWorker` actors, results come back as they
finish (``ray.wait``) and are handed to the store writer, which drops late
duplicates. The queue stays in the driver: a task goes to an actor only when
that actor is known to be up and has a free slot (two by default), so at most
``max_in_flight`` chunks are outstanding and no work waits on an actor that
cannot run it. A busy actor's second slot is filled only while the queue still
holds a task for each actor that is starting, so a short queue is shared with
the actors still importing torch rather than run by the first one up.

Crashed workers and lost nodes: Ray restarts an actor whose process or node dies
(``max_restarts=-1``), but where nothing can host it (a fixed allocation that
lost a node, a spot node without an autoscaler) the restart never happens. So
the driver retries, not Ray (``max_task_retries=0``): the chunks of a lost actor
go back to the front of the queue for the live ones, the lost actor is asked now
and then whether it is back (a restart placed on a node that joined), and a
chunk whose worker is lost more than ``TASK_RETRIES`` times is reported as
failed units. When the cluster grows (``cluster.workers=auto``), actors are
added for the new resources. The same code runs on a laptop
(``cluster.kind=local`` starts a Ray sized to the machine) and on a cluster
(``cluster.kind=ray`` joins RAY_ADDRESS).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
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

TASK_RETRIES = 3  # times a task may lose its worker (or its result) and still be run again
PING_EVERY_S = 2.0  # how often a lost worker is asked whether it is back
GROW_EVERY_S = 5.0  # how often cluster.workers=auto looks for room for more workers
GPU_POLL_S = 2.0
IDLE_WARNING_S = 60.0  # how often to say that no worker is live
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
    """The GPUs each worker asks for.

    ``auto`` is 1 where the cluster has GPUs, else 0. A number of GPUs where there are none:
    a local Ray cannot get any, so that stops at once; a cluster may be waiting for an
    autoscaler, so that waits up to ``cluster.gpu_wait_s`` (asking the autoscaler for a GPU
    node meanwhile) and then stops. Either stop is a :class:`PipelineError` naming the remedies.
    """
    if cluster.gpus_per_worker == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    gpus = float(cluster.gpus_per_worker)
    if not gpus or ray.cluster_resources().get("GPU"):
        return gpus
    remedy = "Set cluster.gpus_per_worker=0 (or auto) to run on the cluster's CPUs, or add GPU nodes"
    if cluster.kind == "local":
        raise PipelineError(f"cluster.gpus_per_worker={gpus:g} but this machine's Ray has no GPU: workers would "
                            f"wait forever. {remedy}.")
    wait_s = float(cluster.gpu_wait_s)
    log.warning("cluster.gpus_per_worker=%g but the Ray cluster has no GPU; waiting up to %.0f s "
                "(cluster.gpu_wait_s) for an autoscaler to add GPU nodes", gpus, wait_s)
    _request_resources([{"GPU": gpus, "CPU": cluster.cpus_per_worker}])  # what an autoscaler scales up for
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(GPU_POLL_S, max(0.0, deadline - time.monotonic())))
            if ray.cluster_resources().get("GPU"):
                return gpus
    finally:
        _request_resources([])
    raise PipelineError(
        f"cluster.gpus_per_worker={gpus:g} but the Ray cluster has no GPU, and none joined within "
        f"cluster.gpu_wait_s={wait_s:g} s: workers would wait forever. {remedy} (or raise cluster.gpu_wait_s "
        f"for an autoscaler that needs longer)."
    )


def _request_resources(bundles: list[dict[str, float]]) -> None:
    """Tell an autoscaler, if the cluster has one, what to scale up for (none: a no-op)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as error:  # only a hint to an autoscaler; the wait works without it
        log.debug("could not request resources from the autoscaler: %s", error)


def worker_count(cluster: ClusterSection, gpus: float) -> int:
    if cluster.workers != "auto":
        return max(1, int(cluster.workers))
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) / gpus))
    return max(1, int(resources.get("CPU", 1) / max(cluster.cpus_per_worker, 1e-3)))


def actor_class(worker_class: type, cluster: ClusterSection, gpus: float):
    """``worker_class`` as a Ray actor that Ray restarts when it dies; retrying its calls is the driver's job."""
    return ray.remote(worker_class).options(
        num_cpus=cluster.cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
    )


def in_flight_limit(cluster: ClusterSection, actors: int) -> int:
    return 2 * actors if cluster.max_in_flight == "auto" else max(1, int(cluster.max_in_flight))


@dataclass
class _Worker:
    """One actor of the pool, as the driver sees it."""

    number: int
    handle: Any
    state: str = "starting"  # starting (not yet placed) | up | lost (restarting, maybe nowhere) | dead
    ping: ray.ObjectRef | None = None  # an outstanding "are you up?" call
    next_ping: float = 0.0
    tasks: list[ray.ObjectRef] = field(default_factory=list)  # its outstanding calls, oldest (running) first
    finished: int = 0  # tasks it returned


class Pool:
    """The actors of one run: which are up, which are lost, and room for more when the cluster grows.

    A worker gets tasks only once it has answered a ping (``__ray_ready__``): an actor Ray
    cannot place, or one restarting after its node died, holds no work. ``wanted`` (called
    every ``GROW_EVERY_S`` while work is queued) says how many workers the cluster has room for.
    """

    def __init__(self, make: Callable[[], Any], count: int, wanted: Callable[[], int] = lambda: 0):
        self._make = make
        self._wanted = wanted
        self._next_grow = time.monotonic() + GROW_EVERY_S
        self.workers: list[_Worker] = []
        self.last_loss = ""
        self._add(count)

    def _add(self, count: int) -> None:
        for _ in range(count):
            self.workers.append(_Worker(len(self.workers) + 1, self._make()))

    @property
    def size(self) -> int:
        return sum(w.state != "dead" for w in self.workers)

    def up(self) -> list[_Worker]:
        return [w for w in self.workers if w.state == "up"]

    def grow(self, now: float, most: int) -> None:
        """Add workers, at most ``most``, where the cluster now has room for more than the pool holds."""
        if now < self._next_grow:
            return
        self._next_grow = now + GROW_EVERY_S
        extra = min(self._wanted() - self.size, most)
        if extra > 0:
            self._add(extra)
            log.info("the cluster has room for more workers: %d added (%d in all)", extra, self.size)

    def send_pings(self, now: float) -> None:
        for worker in self.workers:
            if worker.state in ("starting", "lost") and worker.ping is None and now >= worker.next_ping:
                worker.ping = worker.handle.__ray_ready__.remote()

    def pings(self) -> dict[ray.ObjectRef, _Worker]:
        return {w.ping: w for w in self.workers if w.ping is not None}

    def answered(self, worker: _Worker) -> None:
        """A ping came back: the worker is up, still restarting, or gone for good."""
        ping, worker.ping = worker.ping, None
        try:
            ray.get(ping)
        except ray.exceptions.ActorDiedError as error:  # not restartable (its constructor failed, or killed)
            worker.state = "dead"
            self.last_loss = _first_line(error)
            log.warning("worker %d cannot run: %s", worker.number, self.last_loss)
            return
        except ray.exceptions.RayError:  # restarting, and maybe with nowhere to go: ask again later
            worker.next_ping = time.monotonic() + PING_EVERY_S
            return
        if worker.state == "lost":
            log.info("worker %d is back: %d/%d workers live", worker.number, len(self.up()) + 1, self.size)
        else:
            log.debug("worker %d is up", worker.number)
        worker.state = "up"

    def lose(self, worker: _Worker, error: Exception) -> None:
        if worker.state == "up":
            self.last_loss = _first_line(error)
            log.warning("worker %d lost (%s): its %d outstanding task(s) go to the live workers; %d/%d workers "
                        "live", worker.number, self.last_loss, len(worker.tasks), len(self.up()) - 1, self.size)
        worker.state = "lost"
        worker.tasks.clear()
        worker.next_ping = time.monotonic() + PING_EVERY_S

    def kill(self) -> None:
        for worker in self.workers:  # ends the actor's outstanding calls too (actor tasks cannot be force-cancelled)
            ray.kill(worker.handle)


def drive(pool: Pool, tasks: Iterable[T], submit: Callable[[Any, T], ray.ObjectRef],
          on_done: Callable[[T, Any], None], on_failed: Callable[[T, str, int], None],
          limit: Callable[[int], int], after_wait: Callable[[int, int], bool],
          sent: Iterable[tuple[int, T, ray.ObjectRef]] = ()) -> None:
    """Run ``tasks`` on the pool's live workers, least-loaded first, at most ``limit(pool size)`` in flight.

    The queue is the driver's. ``on_done`` gets each task's result once, in completion
    order (a task run twice, after its worker was thought lost, counts once: only the
    latest submission is awaited); ``on_failed`` gets a task that failed with its one-line
    reason and attempts: at once when the worker raised, after ``TASK_RETRIES`` re-runs
    when the worker or the result was lost. ``after_wait`` gets the live and total worker
    counts after every wait (at least once a second) and returns True to stop early. ``sent``:
    (worker's index in the pool, task, its call) of tasks submitted already, awaited like the
    others. The actors are killed, and with them any outstanding call, however this returns.
    """
    queue: deque[tuple[T, int]] = deque((task, 0) for task in tasks)  # (task, times its worker was lost)
    in_flight: dict[ray.ObjectRef, tuple[T, int, _Worker]] = {}
    for number, task, ref in sent:
        in_flight[ref] = (task, 0, pool.workers[number])
        pool.workers[number].tasks.append(ref)
    idle_since = time.monotonic()
    try:
        while queue or in_flight:
            now = time.monotonic()
            if queue:
                pool.grow(now, len(queue))
            pool.send_pings(now)
            up = pool.up()
            cap = limit(pool.size)
            slots = max(1, math.ceil(cap / max(1, pool.size)))
            starting = sum(w.state == "starting" for w in pool.workers)
            while queue and len(in_flight) < cap:
                # A second task waits in a busy worker's slot only while the queue keeps one for each worker
                # still starting: a short queue (two chunks, two workers) is not stacked on the first one up.
                most = slots if len(queue) > starting else 1
                free = [w for w in up if len(w.tasks) < most]
                if not free:
                    break
                worker = min(free, key=lambda w: len(w.tasks))
                task, lost = queue.popleft()
                ref = submit(worker.handle, task)
                in_flight[ref] = (task, lost, worker)
                worker.tasks.append(ref)
            if not pool.size:  # every worker is gone for good: nothing can run what is left
                reason = f"no worker could run it: {pool.last_loss}"
                while queue:
                    task, lost = queue.popleft()
                    on_failed(task, reason, lost + 1)
                break
            if up or in_flight:
                idle_since = now
            elif now - idle_since >= IDLE_WARNING_S:
                idle_since = now
                log.warning("no worker is live yet: %d worker(s) are starting (each imports torch and builds its "
                            "model, slowly when many share few cores) or wait for a node with room for one "
                            "(committed records are safe; Ctrl-C stops)", pool.size)
            pings = pool.pings()
            waiting = [*in_flight, *pings]
            ready = []
            if waiting:
                ready, rest = ray.wait(waiting, num_returns=1, timeout=1.0)
                if ready and rest:  # and every other result already in: one pass of this loop for all of them
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                    # In submission order: a worker's finished task is taken before the error of the next one,
                    # which killed it, so that one (then its oldest outstanding task) counts the loss.
                    submitted = {ref: number for number, ref in enumerate(waiting)}
                    ready.sort(key=submitted.__getitem__)
            else:  # every worker lost, none due for a ping yet
                time.sleep(0.5)
            for ref in ready:
                if ref in pings:
                    pool.answered(pings[ref])
                    continue
                if ref not in in_flight:  # went back to the queue with its lost worker's other tasks
                    continue
                task, lost, worker = in_flight.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # the worker's own exception: no retry helps
                    worker.tasks.remove(ref)
                    on_failed(task, failure_reason(error), 1)
                    continue
                except ray.exceptions.RayError as error:  # the worker or its result was lost
                    _requeue(pool, queue, in_flight, ref, task, lost, worker, error, on_failed)
                    continue
                worker.tasks.remove(ref)
                worker.finished += 1
                on_done(task, value)
            if after_wait(len(pool.up()), pool.size):
                break
    finally:
        log.debug("tasks per worker: %s", ", ".join(f"{w.number}: {w.finished}" for w in pool.workers))
        pool.kill()


def _requeue(pool: Pool, queue: deque, in_flight: dict, ref: ray.ObjectRef, task: T, lost: int, worker: _Worker,
             error: Exception, on_failed: Callable[[T, str, int], None]) -> None:
    """Put a task whose worker (or result) was lost back at the front of the queue; a lost worker's other
    outstanding tasks go back with it. Only the oldest, the one it was running, counts a loss."""
    if isinstance(error, ray.exceptions.RayActorError):
        refs = list(worker.tasks)  # oldest first; ``ref`` is among them
        pool.lose(worker, error)
    else:
        worker.tasks.remove(ref)
        refs = [ref]
    back = []
    for i, other in enumerate(refs):
        again, losses = (task, lost) if other == ref else in_flight.pop(other)[:2]
        back.append((again, losses + 1 if i == 0 else losses))
    for again, losses in reversed(back):
        if losses > TASK_RETRIES:
            on_failed(again, f"worker lost {losses} times: {_first_line(error)}", losses)
        else:
            queue.appendleft((again, losses))


def run_tasks(worker_class: type, tasks: list[T], cluster: ClusterSection, device: str, progress: Progress,
              commit: Callable[[T, Any, RunSummary], None], fail: Callable[[T, str, int, RunSummary], None],
              tick: Callable[[], None] = lambda: None,
              first: Callable[[list, int], tuple[list[T], list[tuple[int, T, ray.ObjectRef]]]] | None = None
              ) -> RunSummary:
    """Run ``tasks`` on actors of ``worker_class`` (``run(task) -> result``): the one task pool.

    Every job (sweep chunks, dataset-example slices, probe slices) runs through here:
    ``commit`` takes each finished task's result in completion order, ``fail`` each task
    that failed with its one-line reason and attempts; both count into the summary.
    ``tick`` runs after every wait (at least once a second). Stops past
    ``cluster.max_failures`` failed units.

    ``first``: called with the actors' handles and the pool's size once the actors are made, before any task
    is sent; it returns the tasks to run instead of ``tasks`` (which then bound the pool's size), and those it
    sent itself meanwhile: (actor's index, task, its call). A sweep calibrates there, on the first worker,
    while the others start on a feature each.
    """
    summary = RunSummary()
    if not tasks:
        return summary
    start_ray(cluster)
    gpus = gpus_per_worker(cluster)
    remote = actor_class(worker_class, cluster, gpus)
    args = (device, cluster.model_cache, max(1, int(cluster.cpus_per_worker)))

    def wanted() -> int:
        return worker_count(cluster, gpus) if cluster.workers == "auto" else 0

    pool = Pool(lambda: remote.remote(*args), min(worker_count(cluster, gpus), len(tasks)), wanted)
    sent: list[tuple[int, T, ray.ObjectRef]] = []
    if first is not None:
        # An actor answers its calls in order: pinged after ``first`` sent it a task, it would count as starting
        # (not live, given no more work) until that task was done.
        pool.send_pings(time.monotonic())
        try:
            tasks, sent = first([worker.handle for worker in pool.workers], pool.size)
        except BaseException:
            pool.kill()
            raise

    def on_failed(task: T, reason: str, attempts: int) -> None:
        log.warning("%s failed: %s", task.name, reason)
        fail(task, reason, attempts, summary)

    def after_wait(live: int, workers: int) -> bool:
        tick()
        progress.update(done=summary.done, failed=summary.failed, workers=(live, workers))
        summary.aborted = summary.failed > cluster.max_failures
        return summary.aborted

    drive(pool, tasks, lambda actor, task: actor.run.remote(task), lambda task, result: commit(task, result, summary),
          on_failed, lambda size: in_flight_limit(cluster, size), after_wait, sent)
    return summary


def run_plan(plan: Plan, done: set[str], chunk_size: int, cluster: ClusterSection, writer, progress: Progress,
             device: str, worker_class: type | None = None,
             calibrate: Callable[[Any, int, int], int] | None = None) -> RunSummary:
    """Run the plan's missing units on Ray actors, stream results into ``writer``.

    Chunks are at most ``chunk_size`` features, and smaller when that keeps every
    worker busy (a small sweep on many workers). ``worker_class`` (default
    :class:`~pipeline.execution.worker.VisualizationWorker`) turns a chunk into a
    :class:`~pipeline.execution.worker.ChunkResult`; ``bench/scale.py`` passes one that
    makes records without a model, to load the driver and the store at zoo scale.
    ``calibrate(first actor, workers, most)``, when given, runs on the first worker before any
    chunk and returns the chunk size to use, at most ``most`` (what keeps every worker busy); meanwhile
    each other worker runs a chunk of one feature of the plan's costliest group (the group calibrated),
    building its model on the way, rather than wait idle for a chunk size: on a GPU the batch search can
    take half a minute, at layer 11 of a CPU sweep seconds. What is left is chunked at the calibrated size.
    """
    start_ray(cluster)
    workers = worker_count(cluster, gpus_per_worker(cluster))
    todo = len(plan) - len(done)
    most = max(1, math.ceil(todo / workers))
    chunks = plan.chunks(done, min(chunk_size, most))

    worker_class = worker_class or VisualizationWorker

    def chunks_after_calibration(actors: list, size: int) -> tuple[list[Chunk], list[tuple[int, Chunk, Any]]]:
        group = plan.costliest_group(done)  # the group calibrated
        keys = next(keys for other, keys in plan.keyed_groups() if other is group)
        last = ((f, key) for f, key in zip(reversed(group.features), reversed(keys)) if key not in done)
        early = list(itertools.islice(last, size - 1))  # a feature for each worker but the calibrating one
        sent = [(number, chunk, actors[number].run.remote(chunk))
                for number, chunk in enumerate((Chunk(group, (f,)) for f, _ in early), 1)]
        size = min(calibrate(actors[0], size, min(chunk_size, most)), most)
        return plan.chunks(done | {key for _, key in early}, size), sent

    def commit(chunk: Chunk, result, summary: RunSummary) -> None:
        summary.busy_s += result.busy_s
        added = writer.add_encoded(result.records)
        summary.done += added
        summary.duplicates += len(result.records) - added
        for unit, reason, attempts in result.failures:
            _fail_unit(unit, reason, attempts, summary)

    def _fail_unit(unit: dict, reason: str, attempts: int, summary: RunSummary) -> None:
        writer.add_failure(unit, reason, attempts)
        summary.failed += 1
        summary.failures.append((unit["key"], reason))

    def fail(chunk: Chunk, reason: str, attempts: int, summary: RunSummary) -> None:
        for unit in chunk.units():
            _fail_unit(unit, reason, attempts, summary)

    return run_tasks(worker_class, chunks, cluster, device, progress, commit, fail,
                     writer.maybe_commit, chunks_after_calibration if calibrate else None)


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
    """One line: the worker's own exception, or what Ray said."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        cause = error.cause
        return f"worker raised {type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
    return _first_line(error)


def _first_line(error: Exception) -> str:
    """``Type: first line`` of an error; for an actor whose constructor raised, that exception's line."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    if isinstance(error, ray.exceptions.ActorDiedError) and error.actor_init_failed and lines:
        return f"the worker could not start: {lines[-1][:300]}"
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
