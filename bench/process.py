"""Whole processes, as a user runs them: the `vit-atlas sweep` command against the released code's loop.

    make bench-process                                   # deit_tiny, layers 0 and 11, 16 features, 20 steps
    make bench-process ARGS="--layers 0 --repeats 2"

For each layer, two processes, each timed from launch to exit (imports, start-up and all):

- sweep: `vit-atlas sweep` with the project's defaults (2 workers of one thread here, chunks of
  up to 8 features, the forward pass stopped at the target) into a fresh store, so its Hydra
  composition, plan, cost estimate, Ray, worker actors, model builds and commits all count;
- reference: the released code's loop in a fresh Python: one feature at a time, every block run,
  the same optimizer settings (taken from the sweep's own plan) and random weights, on
  ``--threads`` torch threads (all the cores), at the niceness Ray gives its workers (15): on a
  shared machine both ways' compute then yields alike to other users' processes (Ray lowers
  its workers' priority so that its own GCS and raylet stay responsive).

The ratio is reference seconds over sweep seconds (above 1: the sweep is faster). Each run's load
average at its launch is printed: other processes on a shared machine only slow a run down.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
RAY_WORKER_NICENESS = 15  # Ray's default worker_niceness (ray-project/ray#24928)


def sweep_overrides(model: str, layer: int, features: int, steps: int) -> list[str]:
    return [f"sweep.models=[{model}]", f"sweep.layers=[{layer}]", f"sweep.features=first:{features}",
            f"optim.steps={steps}", "model.weights=random"]


def reference(model: str, layer: int, features: int, steps: int, threads: int) -> None:
    """The released code's loop, run in this process: one feature per batch, every block forward."""
    import pipeline  # noqa: F401  (torchvision shim before timm)
    import torch

    from pipeline import cli
    from pipeline.engine.optimize import seed_for, visualize
    from pipeline.engine.visualizer import Visualizer
    from pipeline.execution.plan import build_plan
    from pipeline.engine.objectives import parse_objective

    os.nice(RAY_WORKER_NICENESS - os.nice(0))
    torch.set_num_threads(threads)
    group = build_plan(cli.load("sweep", *sweep_overrides(model, layer, features, steps))).groups[0]
    visualizer = Visualizer(model, group.weights, torch.device("cpu"))
    objective = parse_objective(group.objective)
    precision = visualizer.precision(group.optim.precision, layer, group.target, objective, group.optim).used
    for feature in group.features:
        score = visualizer.score(layer, group.target, objective, [feature], precision, truncate=False)
        visualize(score, [seed_for(feature, group.seed)], visualizer.image_size, group.optim, visualizer.device)


def timed(command: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds from launch to exit, 1-minute load average at launch); a failed run stops the benchmark."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds, load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 11])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the reference's torch threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; each is printed")
    parser.add_argument("--reference-run", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.reference_run:
        reference(args.model, args.layers[0], args.features, args.steps, args.threads)
        return

    script = Path(sys.executable).with_name("vit-atlas")
    print(f"# whole-process benchmark, {dt.date.today().isoformat()}, {os.cpu_count()} cores; {args.model}, "
          f"random weights, {args.features} features, {args.steps} steps; reference on {args.threads} threads")
    print("| layer | run | sweep s | load at launch | reference s | load at launch | reference / sweep |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-process-") as work:
        for layer in args.layers:
            for run in range(1, args.repeats + 1):
                store = os.path.join(work, f"store-{layer}-{run}")
                sweep_s, sweep_load = timed([str(script), "sweep", *sweep_overrides(
                    args.model, layer, args.features, args.steps), f"store.root={store}", "progress.bar=false"], work)
                reference_s, reference_load = timed([sys.executable, os.path.abspath(__file__), "--reference-run",
                                                     "--model", args.model, "--layers", str(layer), "--features",
                                                     str(args.features), "--steps", str(args.steps), "--threads",
                                                     str(args.threads)], work)
                print(f"| {layer} | {run} | {sweep_s:.1f} | {sweep_load:.1f} | {reference_s:.1f} | "
                      f"{reference_load:.1f} | {reference_s / sweep_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
