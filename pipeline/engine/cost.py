"""What a sweep will cost, before it runs: image-steps and FLOPs.

A unit costs ``steps x copies`` truncated forward passes and their backward passes. The forward FLOPs up
to the target come from torch's FLOP counter (pipeline.models.zoo.target_flops), or from the traced
layout where the counter fails; the backward pass of the input gradient is taken as twice the forward,
the usual rule for matrix products. The time is measured on a worker (pipeline.engine.calibrate,
``VisualizationWorker.calibrate``): what this engine reaches on the workers' device, not a datasheet peak.
"""

from __future__ import annotations

import functools

BACKWARD_FACTOR = 2.0  # backward FLOPs per forward FLOP


def unit_flops(forward_flops: int, steps: int, copies: int) -> float:
    return float(forward_flops) * (1 + BACKWARD_FACTOR) * steps * copies


@functools.lru_cache(maxsize=None)
def forward_flops(model: str, img_size: int | None) -> tuple[tuple[int, ...], str]:
    """Forward FLOPs of one image up to each layer's MLP target, and how they were counted: torch's FLOP
    counter (pipeline.models.zoo.target_flops), or, where that raises, :func:`analytic_flops` with the reason.
    A count is for the estimate only, so no model's count may stop a sweep."""
    from pipeline.models import zoo

    try:
        return zoo.target_flops(model, img_size), ""
    except Exception as error:  # noqa: BLE001 (torch's counter fails on some architectures; any reason will do)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return analytic_flops(zoo.layout(model, img_size)), f"the FLOP counter failed on {model} ({reason})"


def analytic_flops(layout) -> tuple[int, ...]:
    """Forward FLOPs up to each layer, counted from the traced layout: per block of T tokens, width C and
    MLP hidden width H, 2T(4C^2 + 2CH) for the projections and MLP and 4T^2 C for attention (a global one:
    an upper bound for windowed attention); the patch embedding is left out."""
    totals, total = [], 0
    for layer in layout.layers:
        hidden = layer.features
        width = layer.sites["attn_out"].features if "attn_out" in layer.sites else max(1, hidden // 4)
        total += 2 * layer.tokens * (4 * width * width + 2 * width * hidden) + 4 * layer.tokens ** 2 * width
        totals.append(total)
    return tuple(totals)


def duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
