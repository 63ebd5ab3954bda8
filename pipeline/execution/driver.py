"""The sweep driver: plan a sweep, subtract what the store holds, run the rest on Ray.

Every input is validated (models, layers, features, weights, store root) before
any compute; a bad one is reported as one paragraph with exit status 2 and
nothing is written. Re-running the same command after any interruption does
only the missing work.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import sys

from pipeline.config import SweepConfig, recorded_param
from pipeline.errors import PipelineError
from pipeline.engine import cost
from pipeline.models import weights
from pipeline.models.weights_id import WeightsId, short_id
from pipeline.execution.plan import Plan, build_plan
from pipeline.execution.progress import Progress
from pipeline.store.store import Store

log = logging.getLogger("pipeline.sweep")

EXIT_FAILURES = 1
EXIT_INTERRUPTED = 130
CALIBRATION_WAIT_S = 300.0  # how long the first worker may take to start and calibrate before the sweep goes on
FALLBACK_CHUNK = 8  # chunk_size=auto where the calibration failed
AUTO_MOST = 1024  # the largest batch chunk_size=auto considers


def _print_plan(plan: Plan, done: set[str], failed: set[str], root: str) -> None:
    planned = len(plan)
    print(f"plan: {planned} planned / {len(done)} already done / {planned - len(done)} to do"
          + (f" ({len(failed)} failed before, retried now)" if failed else ""), flush=True)
    if done:  # reading every image back would cost as much as a read of the whole store
        print(f"  done is what the committed Parquet parts list, not re-read: `vit-atlas status store.root={root} "
              "verify=true` checks every record", flush=True)
    per_model: dict[str, list[int]] = {}
    for group, keys in plan.keyed_groups():
        size = f" at {group.weights.img_size} px" if group.weights.img_size else ""
        counts = per_model.setdefault(f"{group.model}{size} [{group.weights.weights_id}]", [0, 0])
        counts[0] += len(group.features)
        counts[1] += sum(key in done for key in keys)
    for name, (total, finished) in per_model.items():
        print(f"  {name}: {total} planned, {finished} done", flush=True)


def _print_other_revisions(store: Store, plan: Plan) -> None:
    """Say so when the store holds records of a planned model's pretrained tag made from other bytes (another
    hub revision, or from before weights ids named one): their units are not this run's, which go beside."""
    import pyarrow.dataset as ds

    pinned = sorted({(g.model, g.weights.weights_id) for g in plan.groups if g.weights.kind == "pretrained"})
    if not pinned:
        return
    found = store.read_records(["model", "weights"], ds.field("model").isin(sorted({m for m, _ in pinned})))
    stored = set(zip(found["model"].to_pylist(), found["weights"].to_pylist()))
    for model, weights_id in pinned:
        tag = WeightsId.parse(weights_id).tag
        others = sorted(w for m, w in stored if m == model and w != weights_id
                        and (parsed := WeightsId.parse_or_none(w)) is not None and parsed.tag == tag)
        if others:
            print(f"weights: the store holds records of {model} made with {', '.join(others)}: the same weights "
                  f"tag from other bytes (another hub revision, or records from before weights ids named one). "
                  f"This run loads {weights_id}, so its units are planned beside those, which stay as they are.",
                  flush=True)



def _print_cost(plan: Plan, done: set[str]) -> None:
    """What the work to do costs in image-steps and FLOPs, before anything starts; the time comes with the
    calibration (:func:`_calibration`), measured on a worker."""
    image_steps, flops, notes = plan.cost(done)
    for note in notes:  # the count is for the estimate only: the sweep goes on
        print(f"cost: {note}; counted from the model's layout instead", flush=True)
    print(f"cost: {image_steps:,} image-steps ({flops / 1e12:,.1f} TFLOP, forward and backward)", flush=True)


def _estimate(plan: Plan, done: set[str], group, seconds_per_feature_step: float) -> float:
    """Worker-seconds of the work to do: each group's feature-steps at the calibrated group's measured rate,
    scaled by the FLOPs of a step there against the calibrated one's."""
    def step_flops(g) -> float:
        return cost.unit_flops(cost.forward_flops(g.model, g.weights.img_size)[0][g.layer], 1, g.optim.copies)

    measured = step_flops(group)
    seconds = 0.0
    for g, keys in plan.keyed_groups():
        todo = sum(key not in done for key in keys)
        seconds += todo * g.optim.steps * seconds_per_feature_step * step_flops(g) / measured
    return seconds


def _calibration(plan: Plan, done: set[str], cfg: SweepConfig, measured=None):
    """What ``scheduler.run_plan`` calls on its first worker before any chunk, or None where nothing is to be
    measured: the precision (auto, or how slow an explicit low one is), the batch (``chunk_size=auto``) and the
    estimate (``sweep.estimate``), timed on the sweep's costliest group, where the workers run (never on a
    ``cluster=ray`` driver, which may be a small CPU head node). A calibration that fails is one printed line:
    the sweep goes on without an estimate. ``measured``: a calibration already made (by :func:`_fit`), used
    instead of measuring again."""
    group = plan.costliest_group(done)
    search = cfg.sweep.chunk_size == "auto"
    if not (search or cfg.sweep.estimate or group.optim.precision != "fp32"):
        return None

    def calibrate(actor, workers: int, most: int) -> int:
        fallback = min(FALLBACK_CHUNK, most) if search else most
        result = measured or _calibrate_on(actor, group, most, search, f"no time estimate, chunks of {fallback}")
        if result is None:
            return fallback
        if cfg.sweep.estimate and math.isfinite(result.batch.seconds_per_feature_step):
            one = _estimate(plan, done, group, result.batch.seconds_per_feature_step)
            print(f"cost: about {cost.duration(one)} of worker time, about {cost.duration(one / workers)} with "
                  f"{workers} worker{'s' if workers > 1 else ''} ({result.batch.seconds_per_feature_step:.3g} s per "
                  f"feature-step at batch {result.batch.batch} there)", flush=True)
        return min(result.batch.batch, most)

    return calibrate


def _calibrate_on(actor, group, most: int, search: bool, otherwise: str):
    """``actor.calibrate`` (a :class:`~pipeline.execution.worker.Calibration`), printed; None where it failed,
    printed with its reason and ``otherwise``, what the sweep does instead: it goes on."""
    import ray

    from pipeline.execution.scheduler import failure_reason

    try:
        result = ray.get(actor.calibrate.remote(group, most, search), timeout=CALIBRATION_WAIT_S)
    except Exception as error:  # noqa: BLE001 (any failure: the sweep goes on)
        reason = failure_reason(error) if isinstance(error, ray.exceptions.RayError) else repr(error)
        print(f"calibration: failed on a worker ({reason}); {otherwise}", flush=True)
        return None
    choices = [result.precision.describe()] if result.precision else []
    choices.append(result.batch.describe())
    print(f"calibration on a worker, {result.device}, {group.model} layer {group.layer}, took "
          f"{result.seconds:.1f} s: " + "; ".join(choices), flush=True)
    return result


def _size_name(size: dict) -> str:
    return ", ".join(f"optim.{key}={value}" for key, value in size.items())


def _sizes(cfg: SweepConfig) -> list[tuple[str, SweepConfig, Plan]]:
    """With ``sweep.budget_s``: each of ``sweep.sizes`` as (name, config, plan), in order (largest first), all
    validated now, before any compute; [] without a budget. A variant's own optim settings stay as they are."""
    if cfg.sweep.budget_s is None:
        return []
    sizes = []
    for size in cfg.sweep.sizes:
        optim = dataclasses.asdict(cfg.optim)
        unknown = sorted(set(size) - set(optim))
        if unknown:
            raise PipelineError(f"sweep.sizes names {unknown}, which are not optimizer settings; known: "
                                f"{sorted(optim)}.")
        sized = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **size))
        sizes.append((_size_name(size), sized, build_plan(sized)))
    return sizes


def _fit(sizes: list[tuple[str, SweepConfig, Plan]], committed: set[str], cfg: SweepConfig):
    """(config, plan, calibration or None): a size already in the store, else the first (largest) whose work
    fits ``sweep.budget_s`` with this cluster's workers at the speed a worker measures, else the last.

    A size whose every unit is in the store wins without measuring: a second run on the same machine finds
    its units done, however the measurement would come out this time."""
    for name, sized, plan in sizes:
        if set(plan.keys()) <= committed:
            print(f"size: {name} (sweep.sizes), the size already in the store", flush=True)
            return sized, plan, None
    from pipeline.execution import scheduler
    from pipeline.execution.worker import VisualizationWorker

    scheduler.start_ray(cfg.cluster)
    gpus = scheduler.gpus_per_worker(cfg.cluster)
    workers = scheduler.worker_count(cfg.cluster, gpus)
    smallest = sizes[-1][2]
    done = committed & set(smallest.keys())
    group = smallest.costliest_group(done)
    search = cfg.sweep.chunk_size == "auto"
    most = max(1, math.ceil((len(smallest) - len(done)) / workers))
    most = min(most, AUTO_MOST if search else int(cfg.sweep.chunk_size))
    remote = scheduler.actor_class(VisualizationWorker, cfg.cluster, gpus)
    actor = remote.remote(cfg.model.device, cfg.cluster.model_cache, max(1, int(cfg.cluster.cpus_per_worker)))
    try:
        measured = _calibrate_on(actor, group, most, search, f"the last size, {sizes[-1][0]}")
    finally:
        import ray

        ray.kill(actor)
    if measured is None or not math.isfinite(measured.batch.seconds_per_feature_step):
        return sizes[-1][1], sizes[-1][2], None
    budget = float(cfg.sweep.budget_s)
    # The measured group's step, scaled to each size's groups by FLOPs (cost.forward_flops): the measured
    # group is the smallest size's, so its own copies are what the scaling starts from.
    walls = [_estimate(plan, committed & set(plan.keys()), group, measured.batch.seconds_per_feature_step) / workers
             for _, _, plan in sizes]
    chosen = next((i for i, wall in enumerate(walls) if wall <= budget), len(sizes) - 1)
    name, sized, plan = sizes[chosen]
    fits = "the first that fits" if walls[chosen] <= budget else "the last, and it does not fit"
    print(f"size: {name} (sweep.sizes), {fits} sweep.budget_s={budget:g} with {workers} "
          f"worker{'s' if workers > 1 else ''}: about {cost.duration(walls[chosen])} of work", flush=True)
    return sized, plan, measured


def _print_results(store: Store, keys: list[str]) -> None:
    """A table of what a small sweep made (a large one's is for the atlas and readers)."""
    import pyarrow.dataset as ds

    if len(keys) > 40:
        return
    table = store.parquet_dataset().to_table(
        columns=["model", "weights", "layer", "feature", "config_hash", "config", "activation", "label"],
        filter=ds.field("key").isin(keys)).sort_by([("weights", "ascending"), ("layer", "ascending"),
                                                    ("feature", "ascending"), ("config_hash", "ascending")])
    # The config hash and parameterization tell apart the rows of a grid, which share everything else.
    print(f"  {'model':<24} {'weights':<19} {'layer':>5} {'feature':>7} {'config':<12} {'param':<7} "
          f"{'activation':>10}  label")
    for row in table.to_pylist():
        param = recorded_param(json.loads(row["config"])["optim"])
        print(f"  {row['model']:<24} {short_id(row['weights']):<19} {row['layer']:>5} {row['feature']:>7} "
              f"{row['config_hash']:<12} {param:<7} {row['activation']:>10.4f}  {row['label'] or ''}")


def print_where(store: Store) -> None:
    from pipeline.shell import shell_command  # commands that work as printed, in a new shell

    root = store.root
    print(f"store: {root}\n"
          f"  parquet:    pyarrow.dataset.dataset('{root}/parquet', format='parquet', partitioning='hive')\n"
          f"  webdataset: webdataset.WebDataset(sorted(glob.glob('{root}/webdataset/*.tar')))\n"
          f"  status:     {shell_command('status', f'store.root={root}')}\n"
          f"  atlas:      {shell_command('atlas', f'store.root={root}', 'out=site')}  (then open site/index.html)\n"
          f"  figures:    {shell_command('figures', f'store.root={root}', 'out=figures')}", flush=True)


def _out_of_space(store: Store, error: OSError, committed_now: int, done_before: int, planned: int) -> str:
    """One paragraph for a store that filled up mid-sweep: what is safe, and how to go on."""
    from pipeline.shell import shell_command

    return (f"error: The store {store.root} ran out of space ({error.strerror or error}) while this sweep committed "
            f"its records. {committed_now} record(s) of this run were committed before that, beside {done_before} "
            f"from earlier runs: {committed_now + done_before} of the {planned} planned units are in the store, "
            "complete, and the commit that failed left nothing behind. Free space where the store lives (or move "
            "the store to a larger disk and point store.root there), then run the same command again: it "
            f"computes only the missing units. `{shell_command('status', f'store.root={store.root}')}` shows "
            "what is done.")


def run_sweep(cfg: SweepConfig, worker_class: type | None = None) -> int:
    """Plan, then run what the store lacks; the exit status says how it ended.

    A Ray that the sweep starts is shut down when it ends, however it ends; one already running (a test's, a
    notebook's, a cluster joined before) is left as it is. At the interpreter's exit Ray's own shutdown would
    first sleep half a second for late log lines, after every worker is already gone.

    ``worker_class``: what turns chunks into records (scheduler.run_plan; the visualization worker
    unless given).

    - 0: every planned unit is in the store (done now or before);
    - 1 (``EXIT_FAILURES``): some units failed (their reasons are printed and recorded
      under STORE/failures; a re-run retries them), or more than ``cluster.max_failures``
      failed and the sweep stopped early, or the store ran out of space (one paragraph says what
      is committed and how to resume);
    - 130 (``EXIT_INTERRUPTED``): interrupted; the complete records are committed;
    - 2: bad input (a :class:`~pipeline.errors.PipelineError`, raised before any compute
      and reported by the entry point as one paragraph); also a driver refused the store's lease,
      or one that lost it while paused (``LeaseLost``): another driver is doing the work.
    """
    loaded = sys.modules.get("ray")  # not imported yet: not running (and importing it is not a bad input's to pay)
    running = loaded is not None and loaded.is_initialized()
    try:
        return _run_sweep(cfg, worker_class)
    finally:
        if not running and "ray" in sys.modules:  # imported since: perhaps started here (a no-op if not)
            import ray

            ray.shutdown()


def _run_sweep(cfg: SweepConfig, worker_class: type | None) -> int:
    store = Store(cfg.store.root)
    store.check_writable()
    store.recover()  # also when there is nothing to do: an interrupted last commit is finished now
    sizes = _sizes(cfg)
    plan = sizes[-1][2] if sizes else build_plan(cfg)
    for model, choice in plan.weights():
        weights.ensure_available(model, choice)
        verified = weights.ensure_verified(model, choice)
        if verified:
            print(verified, flush=True)

    from pipeline.execution import scheduler

    measured = None
    with store.lease("records", cfg.store.lease_expire_s) as lease:
        # Read once, under the lease, so that it includes what a driver that held the lease before us
        # committed; the failed keys and the writer take this set (a million keys take seconds to read).
        committed = store.committed_keys()
        if sizes:
            cfg, plan, measured = _fit(sizes, committed, cfg)
        keys = plan.keys()
        planned = set(keys)
        done = committed & planned
        failed = store.failed_keys(committed) & planned
        _print_plan(plan, done, failed, store.root)
        _print_other_revisions(store, plan)
        if not planned - done:
            print("nothing to do: every planned unit is already in the store; no workers started.")
            print_where(store)
            return 0
        if cfg.sweep.estimate:
            _print_cost(plan, done)
        scheduler.start_ray(cfg.cluster)
        scheduler.gpus_per_worker(cfg.cluster)  # GPUs asked for and absent stop here (after a bounded wait)
        store.write_plan(plan.units_table, keys)  # tabulated only if this plan is new to the store
        progress = Progress(len(planned - done), cfg.progress.log_every_s, cfg.progress.bar)
        interrupted = False
        writer = store.writer(cfg.store.commit_every, cfg.store.commit_seconds, commit_bytes=cfg.store.commit_bytes,
                              committed=committed, lease=lease)
        try:
            with writer:
                chunk_size = AUTO_MOST if cfg.sweep.chunk_size == "auto" else int(cfg.sweep.chunk_size)
                summary = scheduler.run_plan(plan, done, chunk_size, cfg.cluster, writer, progress,
                                             cfg.model.device, worker_class, _calibration(plan, done, cfg, measured))
        except KeyboardInterrupt:
            interrupted = True
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            progress.close()
            # Two commits run at once: the one beside the commit that failed can leave its staged shard. The
            # writer has ended and this driver holds the lease, so finish or clean up every interrupted commit
            # now (renames and deletes need no space) rather than leave it to the next command that opens it.
            try:
                store.recover(older_than_s=0)
            except OSError as cleanup:
                log.warning("could not clean up after the failed commit (%s); the next command will", cleanup)
            print(_out_of_space(store, error, writer.committed, len(done), len(planned)), file=sys.stderr, flush=True)
            return EXIT_FAILURES
        finally:
            progress.close()
    if interrupted:
        print("interrupted: complete records are committed; run the same command again to do the rest.")
        return EXIT_INTERRUPTED
    print(f"done: {summary.done} new records, {summary.failed} failed, {summary.duplicates} late duplicates "
          f"dropped; workers were busy {summary.busy_s:.1f} s")
    _print_results(store, keys)
    print_where(store)
    if summary.failed:
        print(f"failed units ({summary.failed}; a re-run retries them):")
        reasons: dict[str, int] = {}
        for _, reason in summary.failures:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            print(f"  {count} x {reason}")
    if summary.aborted:
        print(f"stopped: more than cluster.max_failures={cfg.cluster.max_failures} units failed.")
    return EXIT_FAILURES if summary.failed or summary.aborted else 0
