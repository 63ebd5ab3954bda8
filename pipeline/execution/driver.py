"""The sweep driver: plan a sweep, subtract what the store holds, run the rest on Ray.

Every input is validated (models, layers, features, weights, store root) before
any compute; a bad one is reported as one paragraph with exit status 2 and
nothing is written. Re-running the same command after any interruption does
only the missing work.
"""

from __future__ import annotations

import json
import logging
import os

from pipeline.config import SweepConfig
from pipeline.engine import cost
from pipeline.models import weights
from pipeline.execution.plan import Plan, build_plan
from pipeline.execution.progress import Progress
from pipeline.store.store import Store

log = logging.getLogger("pipeline.sweep")

EXIT_FAILURES = 1
EXIT_INTERRUPTED = 130


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


def _print_cost(plan: Plan, done: set[str], cfg) -> None:
    """What the work to do costs, so a sweep of every layer at 400 steps does not surprise a laptop."""
    from pipeline.engine.visualizer import pick_device

    image_steps, flops = plan.cost(done)
    device = pick_device(cfg.model.device)
    group = plan.costliest_group(done)
    threads = max(1, int(cfg.cluster.cpus_per_worker))
    rate = cost.measured_flops_per_second(str(device), group.model, group.weights.img_size, group.layer,
                                          group.optim.precision, group.optim.copies, threads)
    one = flops / rate
    line = (f"cost: {image_steps:,} image-steps ({flops / 1e12:,.1f} TFLOP, forward and backward); one worker "
            f"here reaches {rate / 1e9:,.0f} GFLOP/s on {device.type} ({group.model}, layer {group.layer}, "
            f"{group.optim.precision}): about {cost.duration(one)} of worker time")
    if cfg.cluster.kind == "local" and str(cfg.cluster.workers) == "auto" and device.type == "cpu":
        workers = max(1, int((os.cpu_count() or 1) // max(float(cfg.cluster.cpus_per_worker), 1e-3)))
        line += f", about {cost.duration(one / workers)} with this machine's {workers} workers"
    print(line + ".", flush=True)


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
        param = json.loads(row["config"])["optim"]["param"]
        print(f"  {row['model']:<24} {weights.short_id(row['weights']):<19} {row['layer']:>5} {row['feature']:>7} "
              f"{row['config_hash']:<12} {param:<7} {row['activation']:>10.4f}  {row['label'] or ''}")


def _print_where(store: Store) -> None:
    from pipeline.shell import shell_command  # commands that work as printed, in a new shell

    root = store.root
    print(f"store: {root}\n"
          f"  parquet:    pyarrow.dataset.dataset('{root}/parquet', format='parquet', partitioning='hive')\n"
          f"  webdataset: webdataset.WebDataset(sorted(glob.glob('{root}/webdataset/*.tar')))\n"
          f"  status:     {shell_command('status', f'store.root={root}')}\n"
          f"  atlas:      {shell_command('atlas', f'store.root={root}', 'out=site')}  (then open site/index.html)\n"
          f"  figures:    {shell_command('figures', f'store.root={root}', 'out=figures')}", flush=True)


def run_sweep(cfg: SweepConfig, worker_class: type | None = None) -> int:
    """Plan, then run what the store lacks; the exit status says how it ended.

    ``worker_class``: what turns chunks into records (scheduler.run_plan; the visualization worker
    unless given).

    - 0: every planned unit is in the store (done now or before);
    - 1 (``EXIT_FAILURES``): some units failed (their reasons are printed and recorded
      under STORE/failures; a re-run retries them), or more than ``cluster.max_failures``
      failed and the sweep stopped early;
    - 130 (``EXIT_INTERRUPTED``): interrupted; the complete records are committed;
    - 2: bad input (a :class:`~pipeline.errors.PipelineError`, raised before any compute
      and reported by the entry point as one paragraph).
    """
    store = Store(cfg.store.root)
    store.check_writable()
    store.recover()  # also when there is nothing to do: an interrupted last commit is finished now
    plan = build_plan(cfg)
    for model, choice in plan.weights():
        weights.ensure_available(model, choice)
        verified = weights.ensure_verified(model, choice)
        if verified:
            print(verified, flush=True)
    keys = plan.keys()
    planned = set(keys)

    from pipeline.execution import scheduler

    with store.lease("records"):
        # Read once, under the lease, so that it includes what a driver that held the lease before us
        # committed; the failed keys and the writer take this set (a million keys take seconds to read).
        committed = store.committed_keys()
        done = committed & planned
        failed = store.failed_keys(committed) & planned
        _print_plan(plan, done, failed, store.root)
        if not planned - done:
            print("nothing to do: every planned unit is already in the store; no workers started.")
            _print_where(store)
            return 0
        _print_cost(plan, done, cfg)
        scheduler.start_ray(cfg.cluster)
        scheduler.gpus_per_worker(cfg.cluster)  # GPUs asked for and absent stop here (after a bounded wait)
        store.write_plan(plan.units_table, keys)  # tabulated only if this plan is new to the store
        progress = Progress(len(planned - done), cfg.progress.log_every_s, cfg.progress.bar)
        interrupted = False
        try:
            with store.writer(cfg.store.commit_every, cfg.store.commit_seconds, commit_bytes=cfg.store.commit_bytes,
                              committed=committed) as writer:
                summary = scheduler.run_plan(plan, done, cfg.sweep.chunk_size, cfg.cluster, writer, progress,
                                             cfg.model.device, worker_class)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.close()
    if interrupted:
        print("interrupted: complete records are committed; run the same command again to do the rest.")
        return EXIT_INTERRUPTED
    print(f"done: {summary.done} new records, {summary.failed} failed, {summary.duplicates} late duplicates "
          f"dropped; workers were busy {summary.busy_s:.1f} s")
    _print_results(store, keys)
    _print_where(store)
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
