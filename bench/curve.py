"""What recording the activation curve costs: CPU seconds of its un-augmented forwards in a run (docs/benchmarks.md).

    .venv/bin/python bench/curve.py [--model deit_tiny_patch16_224] [--layers 0 11] [--steps 100]
                                    [--trace-points 20] [--features 1] [--threads 1]

Runs ``pipeline.engine.optimize.visualize`` as a worker does (the paper's settings, random weights, fp32) and
times, inside the run, each call of the score made without a graph: the curve's points, and the final image's
activation, which every run scored before the curve existed and is left out of the cost. CPU time
(``resource.getrusage``: user + system of every thread of this process), not wall time: on a shared machine
other processes only lengthen the wall clock. One thread by default: on an oversubscribed machine, threads
that wait for a descheduled sibling spin, which bills small batches (a curve point scores one image per
feature) for CPU time they do no work in. The FLOP share (``torch.utils.flop_counter``, matmuls and attention)
does not depend on the machine at all.
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch.utils.flop_counter import FlopCounterMode

import pipeline  # noqa: F401  (installs the torchvision shim before timm is imported)
from engine import step_flops  # bench/engine.py: one optimizer step's FLOPs
from pipeline.engine.objectives import parse_objective
from pipeline.config import OptimConfig, paper_optim
from pipeline.engine.optimize import seed_for, visualize
from pipeline.engine.visualizer import Visualizer
from pipeline.models import weights


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def flop_share(score, features: int, image_size: tuple[int, int], config: OptimConfig, points: int) -> float:
    """The curve's share of a run's counted FLOPs: ``points`` un-augmented forwards against the steps."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        score(torch.rand(features, 1, 3, *image_size))
    curve = points * counter.get_total_flops()
    return curve / (config.steps * step_flops(score, features, image_size, config, torch.device("cpu")) + curve)


def measure(visualizer: Visualizer, layer: int, features: list[int], config: OptimConfig
            ) -> tuple[float, float, int, float]:
    """(CPU s of the whole run, CPU s of the curve's forwards, how many, their FLOP share) for one ``visualize``."""
    score = visualizer.score(layer, "mlp", parse_objective("mean"), features, config.precision)
    ungraphed: list[float] = []

    def timed(images: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return score(images)
        started = cpu_seconds()
        out = score(images)
        ungraphed.append(cpu_seconds() - started)
        return out

    started = cpu_seconds()
    visualize(timed, [seed_for(f, 0) for f in features], visualizer.image_size, config, visualizer.device)
    total = cpu_seconds() - started
    curve = ungraphed[:-1]  # the last is the final activation, scored with or without a curve
    return total, sum(curve), len(curve), flop_share(score, len(features), visualizer.image_size, config, len(curve))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 11])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--trace-points", type=int, default=20)
    parser.add_argument("--features", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    visualizer = Visualizer(args.model, weights.resolve(args.model, "random"), torch.device("cpu"))
    config = paper_optim(steps=args.steps, trace_points=args.trace_points, precision="fp32")
    print(f"{args.model}, {args.features} feature(s), {config.copies} copies, {args.steps} steps, "
          f"trace_points={args.trace_points}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| layer | run CPU s | curve forwards | their CPU s | CPU share | FLOP share |")
    print("|---|---|---|---|---|---|")
    for layer in args.layers:
        total, curve, count, flops = measure(visualizer, layer, list(range(args.features)), config)
        print(f"| {layer} | {total:.1f} | {count} | {curve:.2f} | {100 * curve / total:.1f}% | {100 * flops:.2f}% |",
              flush=True)


if __name__ == "__main__":
    main()
