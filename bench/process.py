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

``--stages``: instead, one sweep per layer, its process tree polled every 0.1 s (/proc): when each stage
ended (its output lines, Ray's processes appearing, each worker's title: ``ray::IDLE``, ``__init__``,
``calibrate``, ``run``) and the CPU seconds (user + sys) each process had used by then, which a shared
machine's load inflates far less than wall times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import subprocess
import sys
import tempfile
import threading
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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> dict[int, tuple[str, float]]:
    """Every descendant of ``root``: pid -> (its title, CPU seconds so far)."""
    children: dict[int, list[tuple[int, float]]] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ... utime, stime
        children.setdefault(int(fields[1]), []).append((int(name), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS))
    tree, todo = {}, [root]
    while todo:
        for pid, cpu in children.get(todo.pop(), []):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                title = ""
            tree[pid] = (title.strip(), cpu)
            todo.append(pid)
    return tree


def stages(command: list[str], cwd: str) -> None:
    """Run ``command`` (a sweep), print when each start-up stage ended and the CPU each process had used."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    sweep = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.perf_counter() - started, line) for line in sweep.stdout),
                     daemon=True).start()
    seen: dict[int, list] = {}  # pid -> [title, cpu, first seen, {title prefix: (seconds, cpu) when first seen}]
    while sweep.poll() is None:
        now = time.perf_counter() - started
        for pid, (title, cpu) in process_tree(os.getpid()).items():
            entry = seen.setdefault(pid, [title, cpu, now, {}])
            entry[0], entry[1] = title or entry[0], cpu
            entry[3].setdefault(title.split("(")[0].rstrip(), (now, cpu))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    if sweep.returncode:
        sys.exit(f"{' '.join(command)} exited {sweep.returncode}:\n{''.join(line for _, line in lines)[-3000:]}")

    def line_at(prefix: str) -> float:
        return next(t for t, line in lines if line.startswith(prefix))

    workers = {pid: e for pid, e in seen.items() if any(t.startswith("ray::VisualizationWorker") for t in e[3])}
    ray_own = {pid: e for pid, e in seen.items() if pid not in workers and pid != sweep.pid}
    driver_cpu = sum(e[1] for pid, e in seen.items() if pid == sweep.pid)
    rows = [("driver: imports, config, plan, cost printed (`plan:`/`cost:` lines)", line_at("plan:"), "")]
    if ray_own:
        rows.append(("`ray.init` begins (first Ray process)", min(e[2] for e in ray_own.values()), ""))
    begins = {"ray::IDLE": "process up, Ray imported (`ray::IDLE`)",
              "__init__": "worker module imported, `__init__` begins", "calibrate": "calibration begins",
              "load": "model build begins (`load`)", "run": "first chunk begins"}
    for number, (pid, (_, cpu, _, titles)) in enumerate(sorted(workers.items()), 1):
        for title, (at, cpu_then) in titles.items():
            what = begins.get(title.rpartition(".")[2] if title.startswith("ray::Vis") else title)
            if what:
                rows.append((f"worker {number}: {what}", at, f"{cpu_then:.1f}"))
        rows.append((f"worker {number} in all", None, f"{cpu:.1f}"))
    for prefix, what in (("calibration", "calibration printed"), ("done:", "`done:` printed (every chunk in)")):
        if any(line.startswith(prefix) for _, line in lines):
            rows.append((what, line_at(prefix), ""))
    rows.append(("exit", wall, f"driver {driver_cpu:.1f}, Ray's own processes "
                                f"{sum(e[1] for e in ray_own.values()):.1f}"))
    print(f"load average {load:.1f} at launch, {os.getloadavg()[0]:.1f} at exit")
    print("| stage | ended at s | CPU s of that process by then |\n|---|---|---|")
    for what, at, cpu in sorted(rows, key=lambda row: math.inf if row[1] is None else row[1]):
        print(f"| {what} | {'' if at is None else f'{at:.1f}'} | {cpu} |")
    for _, line in lines:
        if line.startswith(("calibration", "cost: about")):
            print(f"  {line.rstrip()}")
    for pid, (title, cpu, _, _) in sorted(ray_own.items(), key=lambda item: -item[1][1]):
        print(f"  Ray process {pid}: {cpu:.1f} CPU s, {title[:100]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 11])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the reference's torch threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; each is printed")
    parser.add_argument("--stages", action="store_true", help="time the sweep's stages instead (no reference)")
    parser.add_argument("--reference-run", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.reference_run:
        reference(args.model, args.layers[0], args.features, args.steps, args.threads)
        return

    script = Path(sys.executable).with_name("vit-atlas")
    if args.stages:
        with tempfile.TemporaryDirectory(prefix="bench-stages-") as work:
            for layer in args.layers:
                print(f"\n# start-up stages, {dt.date.today().isoformat()}: {args.model} layer {layer}, "
                      f"{args.features} features, {args.steps} steps")
                stages([str(script), "sweep", *sweep_overrides(args.model, layer, args.features, args.steps),
                        f"store.root={work}/store-{layer}", "progress.bar=false"], work)
        return
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
