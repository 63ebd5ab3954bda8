"""What a sweep will cost, before it runs: image-steps, FLOPs, and time at a throughput measured here.

A unit costs ``steps x copies`` truncated forward passes and their backward passes. The forward FLOPs up
to the target come from torch's FLOP counter (pipeline.models.zoo.target_flops); the backward pass of
the input gradient is taken as twice the forward, the usual rule for matrix products. The throughput is
measured once per process by two optimizer steps of the engine itself, on a small ViT at an early
layer, so what it reports is what this engine reaches on this device, not a datasheet peak.
"""

from __future__ import annotations

import functools
import time

import torch

BACKWARD_FACTOR = 2.0  # backward FLOPs per forward FLOP
CALIBRATION_MODEL = "deit_tiny_patch16_224"


def unit_flops(forward_flops: int, steps: int, copies: int) -> float:
    return float(forward_flops) * (1 + BACKWARD_FACTOR) * steps * copies


@functools.lru_cache(maxsize=None)
def measured_flops_per_second(device: str) -> float:
    """FLOP/s one worker's engine reaches on ``device`` (two steps of 2 features x 8 copies, timed)."""
    from pipeline.engine.objectives import parse_objective
    from pipeline.engine.optimize import OptimConfig, visualize
    from pipeline.engine.visualizer import Visualizer
    from pipeline.models import weights, zoo

    layer, features, copies, steps = 3, [0, 1], 8, 2
    visualizer = Visualizer(CALIBRATION_MODEL, weights.resolve(CALIBRATION_MODEL, "random"), torch.device(device))
    score = visualizer.score(layer, "mlp", parse_objective("mean"), features)
    config = OptimConfig.paper(steps=steps, copies=copies)
    visualize(score, [0, 1], visualizer.image_size, config, visualizer.device)  # warm-up: allocations, kernels
    started = time.perf_counter()
    visualize(score, [0, 1], visualizer.image_size, config, visualizer.device)
    elapsed = time.perf_counter() - started
    return unit_flops(zoo.target_flops(CALIBRATION_MODEL)[layer], steps, copies) * len(features) / elapsed


def duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
