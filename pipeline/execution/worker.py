"""A worker: turns chunks into records, keeping a few models loaded.

The scheduler wraps :class:`VisualizationWorker` in a Ray actor, so the models
it loads stay loaded across chunks. A worker never writes the store: it returns
complete records, already encoded for the store (pipeline.store.records: validated, one table and
the WebDataset samples' layout around its images), and failures; the driver commits them exactly once.

Each record also carries what pipeline.engine.measures measures on its stored
image (descriptors, the noise and grey baselines, an early-layer embedding),
computed once per chunk: a forward pass or two, cheap next to the optimization.

A chunk whose checkpoint, directions or MACO spectrum file is no longer the planned
one (by sha256) fails whole, with that reason: its images would not be what the records cite.

Failure handling that belongs to one chunk lives here: a feature whose image or
activation is not finite is retried once on another random stream, then
reported as failed with the reason; a GPU out-of-memory error halves the chunk
and retries each half; a checkpoint file that is no longer the planned one (its
sha256 differs) fails the chunk's units with that reason.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Hashable, TypeVar

import numpy as np
import torch

import pipeline
from pipeline.engine import calibrate, parameterizations
from pipeline.engine.measures import measure
from pipeline.engine.visualizer import Visualizer, pick_device
from pipeline.engine.objectives import Objective, parse_objective
from pipeline.engine.optimize import seed_for
from pipeline.execution.plan import Chunk, Group
from pipeline.models import weights
from pipeline.models.directions import planned_directions
from pipeline.store.png import encode_png
from pipeline.store.records import EncodedRecords, encode_records

NONFINITE_RETRIES = 1
T = TypeVar("T")


@dataclass
class ChunkResult:
    records: EncodedRecords  # the finished records, encoded for the store here rather than in the driver
    failures: list[tuple[dict[str, Any], str, int]] = field(default_factory=list)  # (unit, reason, attempts)
    busy_s: float = 0.0  # seconds spent loading and optimizing


@dataclass(frozen=True)
class Calibration:
    """What one worker measured on its device before the sweep's chunks (pipeline.engine.calibrate)."""

    device: str  # in words: a GPU's name, a CPU's vector capability
    precision: calibrate.PrecisionChoice | None  # None: fp32 asked for, nothing to choose
    batch: calibrate.BatchChoice
    seconds: float  # what the calibration itself took, model load included


@dataclass
class _Outcome:
    """What a chunk has given so far: records (dicts) and failed units."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[dict[str, Any], str, int]] = field(default_factory=list)


def png_bytes(image: torch.Tensor) -> bytes:
    return encode_png(image)


class ModelWorker:
    """The body of a Ray actor that keeps its last few models loaded on one explicit device."""

    def __init__(self, device: str = "auto", model_cache: int = 2, threads: int | None = None):
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = pick_device(device)
        self._cache_size = max(1, model_cache)
        self._models: OrderedDict[Hashable, Any] = OrderedDict()

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """The model under ``key``, built on first use; the least recently used is dropped when full."""
        if key in self._models:
            self._models.move_to_end(key)
        else:
            while len(self._models) >= self._cache_size:
                self._models.popitem(last=False)
            self._models[key] = build()
        return self._models[key]


class VisualizationWorker(ModelWorker):
    def __init__(self, device: str = "auto", model_cache: int = 2, threads: int | None = None):
        super().__init__(device, model_cache, threads)
        self.host = socket.gethostname()

    def visualizer(self, chunk: Chunk) -> Visualizer:
        """The Visualizer of the chunk's model and weights, loaded once and kept (``cached``)."""
        group = chunk.group
        return self.cached((group.model, group.weights),
                           lambda: Visualizer(group.model, group.weights, self.device))

    def calibrate(self, group: Group, most: int, search: bool) -> Calibration:
        """Measure ``group``'s model on this worker's device: its precision (auto, or how slow an explicit low
        one is) and the batch (the best up to ``most`` when ``search``, else the one batch ``most``), with the
        seconds a feature's step takes there. The model stays loaded for the chunks that follow, and so does
        the precision chosen: this worker's chunks of that model use it."""
        started = time.perf_counter()
        visualizer = self.visualizer(Chunk(group, group.features[:1]))
        objective = parse_objective(group.objective)
        directions = planned_directions(group.directions) if group.directions else None
        requested = group.optim.precision
        choice = (visualizer.precision(requested, group.layer, group.target, objective, group.optim, directions)
                  if requested != "fp32" else None)
        used = choice.used if choice else requested
        if choice and choice.used != "fp32" and choice.slowdown > 1 / calibrate.EMULATED_BELOW:
            # An emulated precision asked for explicitly: its steps would take minutes to time, and the probe
            # already says how much slower they are than fp32's.
            fp32 = calibrate.choose_batch(visualizer, group.layer, group.target, objective, group.optim, "fp32",
                                          most, search, directions)
            batch = dataclasses.replace(fp32, seconds_per_feature_step=fp32.seconds_per_feature_step * choice.slowdown,
                                        stopped=fp32.stopped + f", timed in fp32 and scaled by {used}'s slowdown")
        else:
            batch = calibrate.choose_batch(visualizer, group.layer, group.target, objective, group.optim, used,
                                           most, search, directions, choice.step if choice else None)
        return Calibration(calibrate.device_name(self.device), choice, batch, time.perf_counter() - started)

    def run(self, chunk: Chunk) -> ChunkResult:
        started = time.perf_counter()
        result = _Outcome()
        changed = _param_changed(chunk.group)
        if changed:  # every image would be made with a magnitude its records do not cite
            result.failures = [(unit, changed, 1) for unit in chunk.units()]
        else:
            try:
                self._run(chunk, result)
            except weights.PlannedFileChanged as error:  # not the planned file: no unit of it may be recorded
                result.records.clear()
                result.failures = [(unit, str(error), 1) for unit in chunk.units()]
        return ChunkResult(encode_records(result.records), result.failures, time.perf_counter() - started)

    def _run(self, chunk: Chunk, result: _Outcome) -> None:
        try:
            self._optimize(chunk, result)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(chunk.features) == 1:
                unit = chunk.units()[0]
                result.failures.append((unit, f"out of memory on {self.device} even for a single feature", 1))
                return
            for half in chunk.split():
                self._run(half, result)

    def _optimize(self, chunk: Chunk, result: _Outcome) -> None:
        group = chunk.group
        visualizer = self.visualizer(chunk)
        objective = parse_objective(group.objective)
        directions = planned_directions(group.directions) if group.directions else None
        labels = _planted_labels(group)
        optim = group.optim
        if optim.precision == "auto":  # measured once per model on this worker (pipeline.engine.calibrate)
            chosen = visualizer.precision("auto", group.layer, group.target, objective, optim, directions).used
            optim = dataclasses.replace(optim, precision=chosen)
        pending = list(chunk.features)
        for attempt in range(NONFINITE_RETRIES + 1):
            started = time.perf_counter()
            seeds = [seed_for(f, group.seed, attempt) for f in pending]
            out = visualizer.run(group.layer, group.target, objective, pending, seeds, optim, directions)
            per_image = (time.perf_counter() - started) / len(pending)
            retry = []
            records = []
            for i, feature in enumerate(pending):
                if not bool(out.finite[i]):
                    retry.append(feature)
                    continue
                records.append(self._record(chunk, feature, out.images[i], float(out.activations[i]),
                                            out.traces[i].float().numpy(), out.curves[i].float().numpy(),
                                            labels.get(feature), per_image, visualizer, optim.precision))
            result.records.extend(_measured(visualizer, chunk, objective, records, optim.precision, directions))
            pending = retry
            if not pending:
                return
        for feature in pending:
            result.failures.append((group.unit(feature), "objective or image not finite (NaN/inf), also after a "
                                    "retry with another random stream", NONFINITE_RETRIES + 1))

    def _record(self, chunk: Chunk, feature: int, image: torch.Tensor, activation: float, trace: np.ndarray,
                curve: np.ndarray, label: str | None, duration: float, visualizer: Visualizer,
                precision: str) -> dict[str, Any]:
        group = chunk.group
        return {
            **group.unit(feature),
            "config": _config_with_precision(group.config_json, precision),
            "label": label,
            "png": png_bytes(image),
            "activation": activation,
            "activation_trace": trace,
            "activation_curve": curve,
            "steps": group.optim.steps,
            "image_size": visualizer.image_size[0],
            "device": f"{self.device} ({self.host})",
            "precision": precision,
            "duration_s": duration,
            "code_version": pipeline.__version__,
            "timestamp": datetime.now(timezone.utc),
        }


def _config_with_precision(config_json: str, precision: str) -> str:
    """The group's config JSON (what its hash covers: ``optim.precision`` as asked, ``auto`` included) with
    ``precision_used``, the precision this worker actually ran."""
    return json.dumps({**json.loads(config_json), "precision_used": precision}, sort_keys=True)


def _measured(visualizer: Visualizer, chunk: Chunk, objective: Objective, records: list[dict],
              precision: str, directions) -> list[dict]:
    """The records with their measured columns, all of one attempt measured in one batch."""
    if not records:
        return records
    group = chunk.group
    measured = measure(visualizer, group.layer, group.target, objective, [r["feature"] for r in records],
                       [r["png"] for r in records], precision, directions)
    return [{**record, **values} for record, values in zip(records, measured)]


def _param_changed(group) -> str | None:
    """Why a chunk's parameterization would not make the images its config hash names (a MACO spectrum file
    rewritten since the sweep was planned), or None."""
    planned = json.loads(group.config_json)["param_identity"]
    try:
        found = parameterizations.settings(group.optim.param).identity()
    except OSError as error:
        found = {name: f"unreadable ({type(error).__name__})" for name in planned}
    changed = [f"optim.param.{name}={group.optim.param[name]}: planned {planned[name]}, found {found.get(name)}"
               for name in sorted(planned) if found.get(name) != planned[name]]
    if not changed:
        return None
    return f"{'; '.join(changed)}: changed since the sweep was planned; re-run to plan with the new file"


def _planted_labels(group) -> dict[int, str]:
    if group.weights.kind != "planted" or group.directions:  # a direction's unit is no planted channel
        return {}
    from pipeline.models import planted

    return {u.feature: f"planted: {u.label}" for u in planted.planted_units(group.model)
            if u.layer == group.layer and group.target == "mlp"}
