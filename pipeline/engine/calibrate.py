"""Choices made by measurement on the device that does the work: precision and batch.

A default tuned on one machine can be 50x wrong on another: bf16 autocast is ~2x faster than fp32 on a
CPU with AMX or a GPU with bf16 tensor cores, and ~50x slower where it is emulated (AVX2 CPUs). So
``optim.precision=auto`` and ``sweep.chunk_size=auto`` are decided here, by timing, on a worker.

Precision is measured in two stages, because timing a bf16 optimizer step where bf16 is emulated takes
seconds to minutes: first one matrix product of the model's MLP shape in fp32 and in the low precision
(milliseconds); only where the low precision is not clearly slower there are real optimizer steps timed
in both. The low precision is bf16, or fp16 on a GPU without native bf16.

The batch (features per chunk) doubles from 1 while a step's throughput rises by ``BATCH_GAIN`` and the
device's memory holds it, within a time budget.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from pipeline.config import OptimConfig
from pipeline.engine.optimize import visualize

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the score's autocast dtype
EMULATED_BELOW = 0.5  # low/fp32 matmul rate under which the low precision is taken as emulated, without steps
PROBE_FLOPS = 3e7  # one probe product: milliseconds in fp32, ~30 ms where bf16 is emulated
PROBE_SECONDS = 0.02  # each probe repeats its product for at least this long (after one warm-up product)
BATCH_GAIN = 1.10  # a larger batch is taken only if it raises features x steps per second by 10 %
BATCH_BUDGET_S = {"cpu": 8.0, "cuda": 30.0}  # the batch search stops before its measurements pass this
MEMORY_SHARE = 0.8  # a batch must fit in this share of the GPU's memory, judged by its measured peak
STEPS_UNIT = "feature-steps/s (optimizer steps)"


@dataclass(frozen=True)
class OneFeatureStep:
    """A timed optimizer step of feature 0 alone: what the batch search would time first (its batch 1), kept so
    that a search after the precision's steps does not time it again (a step takes seconds on a CPU)."""

    layer: int
    target: str
    objective: object
    optim: OptimConfig
    precision: str
    seconds: float
    directions: object = None  # the Directions scored, if any (the same object: tensors have no equality)

    def times(self, layer: int, target: str, objective, optim: OptimConfig, precision: str, directions=None) -> bool:
        return (self.layer, self.target, self.objective, self.optim, self.precision) == (
            layer, target, objective, optim, precision) and self.directions is directions


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` (or an explicit precision) resolves to on one device, and the measurement behind it."""

    requested: str
    used: str
    low: str  # the low precision measured against fp32: bf16, or fp16 on a GPU without bf16
    fp32_rate: float  # the measured rates: GFLOP/s of the probe product, or features x steps per second
    low_rate: float
    unit: str  # "GFLOP/s (matmul probe)" | STEPS_UNIT
    step: OneFeatureStep | None = None  # the timed step of the precision used, where steps decided

    @property
    def slowdown(self) -> float:
        """How many times slower the low precision measured than fp32 (< 1: faster)."""
        return self.fp32_rate / self.low_rate if self.low_rate > 0 else math.inf

    def describe(self) -> str:
        rates = f"{self.low} {self.low_rate:,.3g} against fp32 {self.fp32_rate:,.3g} {self.unit}"
        if self.requested == "auto":
            return f"precision auto -> {self.used} ({rates})"
        if self.requested != "fp32" and self.slowdown > 1:
            return (f"precision {self.requested} is {self.slowdown:,.1f}x slower than fp32 on this device ({rates}); "
                    f"optim.precision=auto would use the faster")
        return f"precision {self.requested} ({rates})"


def low_precision(device: torch.device) -> str:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def device_name(device: torch.device) -> str:
    """The device in words: a GPU's name, a CPU's vector capability (AVX2, AVX512, ...)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.backends.cpu.get_cpu_capability()})"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(width: int, hidden: int, dtype: torch.dtype, device: torch.device) -> float:
    """GFLOP/s of (rows x width) @ (width x hidden) in ``dtype``, rows sized to ~PROBE_FLOPS per product."""
    rows = max(16, math.ceil(PROBE_FLOPS / (2 * width * hidden)))
    a = torch.randn(rows, width, device=device).to(dtype)
    b = torch.randn(width, hidden, device=device).to(dtype)
    a @ b  # kernels, allocations
    _synchronize(device)
    count, started = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        _synchronize(device)
        elapsed = time.perf_counter() - started
        if elapsed >= PROBE_SECONDS:
            return 2 * rows * width * hidden * count / elapsed / 1e9


def step_seconds(visualizer, layer: int, target: str, objective, features: list[int], optim: OptimConfig,
                 precision: str, directions=None) -> float:
    """Wall seconds of one optimizer step of ``features`` together (one ``visualize`` call of one step)."""
    config = dataclasses.replace(optim, steps=1, precision=precision)
    score = visualizer.score(layer, target, objective, features, precision, directions=directions)
    _synchronize(visualizer.device)
    started = time.perf_counter()
    visualize(score, features, visualizer.image_size, config, visualizer.device)
    _synchronize(visualizer.device)
    return time.perf_counter() - started


def choose_precision(visualizer, requested: str, layer: int, target: str, objective,
                     optim: OptimConfig, directions=None) -> PrecisionChoice:
    """``requested`` (auto | fp32 | bf16 | fp16) resolved on the visualizer's device, with the rates behind it.

    ``auto`` uses the low precision only where a timed step is faster than fp32; fp32 otherwise. An explicit
    precision is kept (measured with the probe, so that a slow one can be named)."""
    device = visualizer.device
    low = low_precision(device) if requested in ("auto", "fp32") else requested
    info = visualizer.layout.layer(layer)
    width = info.sites["attn_out"].features if "attn_out" in info.sites else max(1, info.features // 4)
    fp32_rate = matmul_rate(width, info.features, torch.float32, device)
    low_rate = matmul_rate(width, info.features, PRECISIONS[low], device)
    measured = PrecisionChoice(requested, requested, low, fp32_rate, low_rate, "GFLOP/s (matmul probe)")
    if requested != "auto":
        return measured
    if low_rate < EMULATED_BELOW * fp32_rate:  # clearly emulated: a step would take seconds to learn the same
        return dataclasses.replace(measured, used="fp32")
    unit = (layer, target, objective, [0], optim)
    step_seconds(visualizer, *unit, "fp32", directions)  # a warm-up: allocations, kernels
    fp32_step = step_seconds(visualizer, *unit, "fp32", directions)
    step_seconds(visualizer, *unit, low, directions)
    low_step = step_seconds(visualizer, *unit, low, directions)
    used, seconds = (low, low_step) if low_step < fp32_step else ("fp32", fp32_step)
    return PrecisionChoice(requested, used, low, 1 / fp32_step, 1 / low_step, STEPS_UNIT,
                           OneFeatureStep(layer, target, objective, optim, used, seconds, directions))


@dataclass(frozen=True)
class BatchChoice:
    batch: int
    seconds_per_feature_step: float  # at that batch: what one feature's step costs
    measured: tuple[tuple[int, float], ...]  # (batch, features x steps per second) as measured, in order
    stopped: str  # why the search stopped there

    def describe(self) -> str:
        rates = ", ".join(f"{batch}: {rate:,.3g}" for batch, rate in self.measured)
        return f"batch {self.batch} (feature-steps/s by batch {rates}; {self.stopped})"


def choose_batch(visualizer, layer: int, target: str, objective, optim: OptimConfig, precision: str, most: int,
                 search: bool = True, directions=None, timed: OneFeatureStep | None = None) -> BatchChoice:
    """The largest batch up to ``most`` (doubling from 1) whose measured throughput rises by ``BATCH_GAIN``
    over the last and that fits the device's memory, within ``BATCH_BUDGET_S``. ``search=False``: the one
    batch ``most`` is timed, for the estimate. ``timed``: a step of one feature timed already (by
    :func:`choose_precision`); where it is this search's batch 1, it stands for it and for the warm-up."""
    device = visualizer.device
    width = directions.count if directions is not None else visualizer.layout.site(layer, target).features
    most = max(1, min(most, width))
    budget = BATCH_BUDGET_S.get(device.type, BATCH_BUDGET_S["cuda"])
    cuda = device.type == "cuda"
    total_memory = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    spent, batch, measured = 0.0, 1 if search else most, []
    known = (timed.seconds if timed and batch == 1 and timed.times(layer, target, objective, optim, precision, directions)
             else None)
    if known is None:
        step_seconds(visualizer, layer, target, objective, [0], optim, precision, directions)  # a warm-up
    best: tuple[int, float] | None = None
    stopped = "the batch asked for" if not search else f"the largest useful here, {most}"
    while True:
        if known is not None:  # the peak memory since then is that step's, or a larger fp32 one's
            seconds, known = known, None
        else:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = step_seconds(visualizer, layer, target, objective, list(range(batch)), optim, precision,
                                       directions)
            except torch.OutOfMemoryError:
                stopped = f"{batch} ran out of memory"
                break
        spent += seconds
        rate = batch / seconds
        measured.append((batch, rate))
        if best is not None and rate < best[1] * BATCH_GAIN:
            stopped = f"{batch} was not {BATCH_GAIN - 1:.0%} faster"
            break
        best = (batch, rate)
        if not search or batch >= most:
            break
        if cuda and 2 * torch.cuda.max_memory_allocated(device) > MEMORY_SHARE * total_memory:
            stopped = f"{2 * batch} would not fit in {MEMORY_SHARE:.0%} of the GPU's memory"
            break
        if spent + 2 * seconds > budget:
            stopped = f"{2 * batch} would pass the {budget:g} s measuring budget"
            break
        batch = min(2 * batch, most)
    if best is None:  # even one feature ran out of memory: the chunk will say so
        return BatchChoice(1, math.inf, tuple(measured), stopped)
    return BatchChoice(best[0], 1 / best[1], tuple(measured), stopped)
