"""What a probe is: conditions planned up front, measurements per image batch, a report and a plot.

A probe's measurements are sums with counts (correct predictions over images,
summed concentration over features and images), so the units' parts add up to
the result however the image set was sliced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch import nn

from pipeline.analysis import images as images_lib
from pipeline.store.schemas import PROBE_RESULT_SCHEMA

@dataclass(frozen=True)
class Condition:
    name: str
    param: float | None = None


@dataclass
class Tally:
    """Running (total, count) per (condition, param, feature, metric)."""

    sums: dict[tuple[str, float | None, int, str], list[float]] = field(default_factory=dict)

    def add(self, condition: Condition, metric: str, total: float, count: int, feature: int = -1) -> None:
        cell = self.sums.setdefault((condition.name, condition.param, feature, metric), [0.0, 0])
        cell[0] += float(total)
        cell[1] += int(count)

    def add_many(self, condition: Condition, metric: str, totals: torch.Tensor, counts: torch.Tensor,
                 features: list[int]) -> None:
        """Per-feature sums: ``totals`` and ``counts`` are aligned with ``features``."""
        for feature, total, count in zip(features, totals.tolist(), counts.tolist()):
            self.add(condition, metric, total, int(count), feature)

    def table(self, model: str, weights: str) -> pa.Table:
        rows = [{"model": model, "weights": weights, "condition": c, "param": p, "feature": f, "metric": m,
                 "total": t, "count": n} for (c, p, f, m), (t, n) in self.sums.items()]
        return pa.Table.from_pylist(rows, schema=PROBE_RESULT_SCHEMA)


@dataclass(frozen=True)
class Batch:
    images: list[images_lib.LabelledImage]
    labels: torch.Tensor  # (B,) on the model's device
    preprocess: images_lib.Preprocess
    device: torch.device

    def model_input(self, crops: torch.Tensor) -> torch.Tensor:
        return self.preprocess.normalize(crops.to(self.device))

    def crops(self) -> torch.Tensor:
        return torch.stack([self.preprocess.crop(image.pixels) for image in self.images])

    def boxed(self) -> list[int]:
        """Indices of the images that have boxes of their own class (the box probes measure only those)."""
        return [i for i, image in enumerate(self.images) if image.true_class_boxes()]


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 correct, top-5 correct) counts."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(-1).sum())


class Probe(ABC):
    """A probe sets ``name`` (its results table) and ``needs_boxes`` (whether images need boxes)."""

    name: str
    needs_boxes = False

    @abstractmethod
    def conditions(self, params: dict, model: str) -> list[Condition]:
        """Validated conditions for one model; raise PipelineError for bad params or unsuitable models."""

    @abstractmethod
    def measure(self, model: nn.Module, batch: Batch, conditions: list[Condition], params: dict,
                tally: Tally, model_name: str) -> None:
        """Add this batch's measurements under every condition to ``tally``."""

    @abstractmethod
    def report(self, results: pa.Table) -> str:
        """A Markdown table of the aggregated results (one row per model)."""

    @abstractmethod
    def plot(self, results: pa.Table) -> bytes:
        """A PNG figure of the aggregated results."""


def aggregate(results: pa.Table) -> list[dict]:
    """Sum the parts: one row per (model, weights, condition, param, feature, metric) with value = total / count."""
    keys = ["model", "weights", "condition", "param", "feature", "metric"]
    summed = results.group_by(keys, use_threads=False).aggregate([("total", "sum"), ("count", "sum")])
    rows = summed.to_pylist()
    for row in rows:
        row["value"] = row["total_sum"] / row["count_sum"] if row["count_sum"] else float("nan")
    return rows
