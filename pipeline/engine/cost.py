"""What a sweep will cost, before it runs: image-steps, FLOPs, and time at a throughput measured here.

A unit costs ``steps x copies`` truncated forward passes and their backward passes. The forward FLOPs up
to the target come from torch's FLOP counter (pipeline.models.zoo.target_flops); the backward pass of
the input gradient is taken as twice the forward, the usual rule for matrix products. The throughput is
measured once per process by two optimizer steps of the engine itself, on the sweep's costliest
model at the precision and thread count its workers use, so what it reports is what this engine
reaches on this device, not a datasheet peak.
"""

from __future__ import annotations

import functools
import time

import torch

BACKWARD_FACTOR = 2.0  # backward FLOPs per forward FLOP


def unit_flops(forward_flops: int, steps: int, copies: int) -> float:
    return float(forward_flops) * (1 + BACKWARD_FACTOR) * steps * copies


@functools.lru_cache(maxsize=None)
def measured_flops_per_second(device: str, model: str, img_size: int | None, layer: int, precision: str,
                              copies: int, threads: int) -> float:
    """FLOP/s one worker's engine reaches on ``device`` for ``model`` at ``layer`` in ``precision``: two
    optimizer steps of one feature x ``copies``, timed after a warm-up step, with the worker's ``threads``
    on a CPU. Random weights: the throughput does not depend on them, and nothing needs loading."""
    from pipeline.engine.objectives import parse_objective
    from pipeline.engine.optimize import OptimConfig, visualize
    from pipeline.engine.visualizer import Visualizer
    from pipeline.models import weights, zoo

    steps = 2
    visualizer = Visualizer(model, weights.resolve(model, "random", img_size=img_size), torch.device(device))
    score = visualizer.score(layer, "mlp", parse_objective("mean"), [0], precision)
    warm_up, timed = (OptimConfig.paper(steps=n, copies=copies, precision=precision) for n in (1, steps))
    threads_before = torch.get_num_threads()
    if visualizer.device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        visualize(score, [0], visualizer.image_size, warm_up, visualizer.device)  # allocations, kernels
        if visualizer.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        visualize(score, [0], visualizer.image_size, timed, visualizer.device)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads_before)
    return unit_flops(zoo.target_flops(model, img_size)[layer], steps, copies) / elapsed


def duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
