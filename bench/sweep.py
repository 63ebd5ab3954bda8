"""Sweep benchmark: how much of a sweep's wall time the workers spend optimizing, and how
throughput scales from one worker to two (each worker one core, one torch thread).

    make bench-sweep                      # defaults: 32 units, 30 steps, deit_tiny layer 0
    make bench-sweep ARGS="--units 32 --steps 60"

Wall time is taken around the scheduler alone (Ray already up, as in a long sweep where
its start-up is amortized); it includes starting the worker actors, loading the model,
dispatch, result transfer and committing to the store. "Busy" is what the workers report:
seconds inside their chunk calls (model load included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pipeline  # noqa: E402,F401  (torchvision shim before timm)
import ray  # noqa: E402

from pipeline import cli  # noqa: E402
from pipeline.execution import scheduler  # noqa: E402
from pipeline.execution.plan import build_plan  # noqa: E402
from pipeline.execution.progress import Progress  # noqa: E402
from pipeline.store.store import Store  # noqa: E402


def measure(workers: int, args: argparse.Namespace) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix=f"bench-sweep-{workers}w-")
    cfg = cli.load("sweep",
                   f"sweep.models=[{args.model}]", f"sweep.layers=[{args.layer}]", f"sweep.features=first:{args.units}",
                   "sweep.chunk_size=1", f"optim.steps={args.steps}", f"cluster.workers={workers}",
                   "cluster.cpus_per_worker=1", "cluster.gpus_per_worker=0", f"store.root={root}",
                   "progress.bar=false", "store.commit_every=8")
    plan = build_plan(cfg)
    store = Store(root)
    started = time.perf_counter()
    with store.writer(cfg.store.commit_every, cfg.store.commit_seconds) as writer:
        summary = scheduler.run_plan(plan, set(), 1, cfg.cluster, writer, Progress(len(plan), bar=False), "cpu")
    wall = time.perf_counter() - started
    assert summary.done == len(plan), summary
    return {"workers": workers, "units": summary.done, "wall_s": wall, "busy_s": summary.busy_s,
            "busy_share": summary.busy_s / (wall * workers), "units_per_s": summary.done / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    results = [measure(1, args), measure(2, args)]
    print(f"sweep benchmark: {args.model} layer {args.layer}, {args.units} units x {args.steps} steps, "
          f"1 feature per chunk, {os.cpu_count()} cores")
    print(f"{'workers':>7}  {'units':>5}  {'wall s':>7}  {'busy s':>7}  {'busy share':>10}  {'units/s':>8}")
    for r in results:
        print(f"{r['workers']:>7}  {r['units']:>5}  {r['wall_s']:>7.1f}  {r['busy_s']:>7.1f}  "
              f"{100 * r['busy_share']:>9.1f}%  {r['units_per_s']:>8.3f}")
    print(f"2 workers / 1 worker throughput: {results[1]['units_per_s'] / results[0]['units_per_s']:.2f}x")


if __name__ == "__main__":
    main()
