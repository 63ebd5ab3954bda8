"""The probe worker: one model, one slice of images, every condition of one probe; returns the sums."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import nn

from pipeline import images as images_lib
from pipeline.engine import pick_device
from pipeline.probes import PROBES, classifier
from pipeline.probes.base import Batch, Condition, Tally


@dataclass(frozen=True)
class ProbeTask:
    part_id: str
    probe: str
    model: str
    weights: classifier.ClassifierChoice
    conditions: tuple[Condition, ...]
    params: dict
    images: images_lib.ImageSet  # this task's slice
    batch_size: int


class ProbeWorker:
    def __init__(self, device: str = "auto", model_cache: int = 2, threads: int | None = None):
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = pick_device(device)
        self.model_cache = max(1, model_cache)
        self._models: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()

    def _model(self, task: ProbeTask) -> nn.Module:
        key = (task.model, task.weights.weights_id)
        if key in self._models:
            self._models.move_to_end(key)
        else:
            while len(self._models) >= self.model_cache:
                self._models.popitem(last=False)
            self._models[key] = classifier.load(task.weights, self.device)
        return self._models[key]

    def run(self, task: ProbeTask) -> pa.Table:
        model = self._model(task)
        probe = PROBES[task.probe]
        preprocess = images_lib.Preprocess.from_config(model.pretrained_cfg)
        tally = Tally()
        for start in range(0, len(task.images), task.batch_size):
            loaded = [task.images.load(i) for i in range(start, min(start + task.batch_size, len(task.images)))]
            labels = torch.tensor([image.ref.label for image in loaded], device=self.device)
            probe.measure(model, Batch(loaded, labels, preprocess, self.device), list(task.conditions), task.params,
                          tally, task.model)
        return tally.table(task.model, task.weights.weights_id)
