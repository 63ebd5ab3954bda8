"""The probe worker: one model, one slice of images, every condition of one probe; returns the sums."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import nn

from pipeline.analysis import images as images_lib
from pipeline.execution.worker import ModelWorker
from pipeline.models import weights as weights_lib
from pipeline.analysis.probes import PROBES
from pipeline.analysis.probes.base import Batch, Condition, Tally


@dataclass(frozen=True)
class ProbeTask:
    part_id: str
    probe: str
    model: str
    weights: weights_lib.WeightsChoice
    conditions: tuple[Condition, ...]
    params: dict
    images: images_lib.ImageSet  # this task's slice
    batch_size: int

    @property
    def name(self) -> str:
        return f"unit {self.part_id}"


class ProbeWorker(ModelWorker):
    def _model(self, task: ProbeTask) -> nn.Module:
        return self.cached((task.model, task.weights.weights_id),
                           lambda: weights_lib.load(task.model, task.weights, self.device))

    def run(self, task: ProbeTask) -> pa.Table:
        model = self._model(task)
        probe = PROBES[task.probe]
        preprocess = images_lib.Preprocess.for_model(model)
        tally = Tally()
        for loaded in task.images.batches(task.batch_size):  # each tar of the slice read once, in order
            labels = torch.tensor([image.ref.label for image in loaded], device=self.device)
            probe.measure(model, Batch(loaded, labels, preprocess, self.device), list(task.conditions), task.params,
                          tally, task.model)
        return tally.table(task.model, task.weights.weights_id)
