"""The dataset-examples worker: one model, one slice of images, every needed unit at once.

For each batch of images it runs one truncated forward that captures all needed
(layer, target) sites (stopped once the last is read), takes each unit's per-patch
score (a channel, or a direction's projection as the sweep scores it) and its
patch mean (the sweep's ``mean`` objective), and keeps, per unit, the slice's top-k
images with their activation maps over the patch grid. The driver merges slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import torch

from pipeline.analysis import images as images_lib
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.models.directions import recorded_directions
from pipeline.engine.activations import ActivationReader
from pipeline.execution.worker import ModelWorker
from pipeline.store.png import encode_png
from pipeline.store.schemas import EXAMPLE_SLICES


@dataclass(frozen=True, order=True)
class UnitKind:
    """What a unit of a layer reads: a channel of ``target``, or with ``directions_sha256`` a row of that
    directions file projected onto the target's tokens."""

    target: str
    directions_sha256: str = ""
    # Where the records found the file: not part of the unit (records of one file at two paths share their units).
    directions_path: str = field(default="", compare=False)

    @property
    def name(self) -> str | None:
        """The slices' ``kind`` column: None for an MLP channel, the only kind before the others were ranked."""
        if self.target == "mlp" and not self.directions_sha256:
            return None
        return f"{self.target}@{self.directions_sha256}" if self.directions_sha256 else self.target


MLP_CHANNEL = UnitKind("mlp")


@dataclass(frozen=True, order=True)
class Unit:
    """One visualized unit of a model whose dataset examples are ranked."""

    layer: int
    feature: int  # the channel, or the row of the directions file
    kind: UnitKind


@dataclass(frozen=True)
class ExampleTask:
    part_id: str  # <batch id>-<slice index>
    model: str
    weights: weights_lib.WeightsChoice
    units: tuple[Unit, ...]  # sorted
    images: images_lib.ImageSet  # this task's slice
    k: int
    batch_size: int
    thumbnail: int

    @property
    def name(self) -> str:
        return f"unit {self.part_id}"


@dataclass
class _TopK:
    """The best k images of a slice for the units of one (layer, kind)."""

    values: torch.Tensor  # (k', F), descending per column
    indices: torch.Tensor  # (k', F) image index within the slice
    maps: torch.Tensor  # (k', F, P)

    def update(self, values: torch.Tensor, indices: torch.Tensor, maps: torch.Tensor, k: int) -> None:
        values = torch.cat([self.values, values])
        indices = torch.cat([self.indices, indices])
        maps = torch.cat([self.maps, maps])
        top = values.topk(min(k, values.shape[0]), dim=0)
        self.values = top.values
        self.indices = indices.gather(0, top.indices)
        self.maps = maps.gather(0, top.indices[..., None].expand(-1, -1, maps.shape[-1]))


class ExampleWorker(ModelWorker):
    def _reader(self, task: ExampleTask) -> tuple[ActivationReader, images_lib.Preprocess]:
        def build() -> tuple[ActivationReader, images_lib.Preprocess]:
            model = weights_lib.load(task.model, task.weights, self.device)
            layout = zoo.layout(task.model, task.weights.img_size)
            return ActivationReader(model, layout), images_lib.Preprocess.for_model(model, layout.input_size)

        return self.cached((task.model, task.weights), build)

    @torch.no_grad()
    def run(self, task: ExampleTask) -> pa.Table:
        reader, preprocess = self._reader(task)
        by_site: dict[tuple[int, UnitKind], list[int]] = {}
        for unit in task.units:
            by_site.setdefault((unit.layer, unit.kind), []).append(unit.feature)
        # A directions file that is not the recorded one fails the task here, before any image is read.
        scores = {(layer, kind): self._scores(kind, features) for (layer, kind), features in by_site.items()}
        best: dict[tuple[int, UnitKind], _TopK] = {}
        thumbnails: list[torch.Tensor] = []
        start = 0
        for loaded in task.images.batches(task.batch_size):  # each tar of the slice read once, in order
            stop = start + len(loaded)
            crops = torch.stack([preprocess.crop(image.pixels) for image in loaded])
            thumbnails.extend(images_lib.thumbnail(crop, task.thumbnail) for crop in crops)
            activations = reader.read_sites(preprocess.normalize(crops.to(self.device)),
                                            [(layer, kind.target) for layer, kind in by_site])
            for (layer, kind), score in scores.items():
                maps = score(activations[layer, kind.target].float()).transpose(1, 2)  # (B, F, P)
                values = maps.mean(-1)
                indices = torch.arange(start, stop, device=self.device)[:, None].expand_as(values)
                if (layer, kind) not in best:
                    best[layer, kind] = _TopK(values[:0], indices[:0], maps[:0])
                best[layer, kind].update(values, indices, maps, task.k)
            start = stop
        return self._rows(task, reader.layout, by_site, best, thumbnails)

    def _scores(self, kind: UnitKind, features: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """tokens (B, P, C) -> (B, P, F): the units' score per token, as the sweep's objective takes it."""
        if kind.directions_sha256:
            return recorded_directions(kind.directions_path, kind.directions_sha256).projection_of_all(
                features, self.device)
        columns = torch.tensor(features, device=self.device)
        return lambda tokens: tokens.index_select(-1, columns)

    def _rows(self, task: ExampleTask, layout: zoo.ModelLayout, by_site: dict[tuple[int, UnitKind], list[int]],
              best: dict[tuple[int, UnitKind], _TopK], thumbnails: list[torch.Tensor]) -> pa.Table:
        encoded: dict[int, bytes] = {}
        rows = []
        for (layer, kind), features in by_site.items():
            top = best[layer, kind]
            rows_, cols_ = layout.layer(layer).grid
            for column, feature in enumerate(features):
                for rank in range(top.values.shape[0]):
                    index = int(top.indices[rank, column])
                    if index not in encoded:
                        encoded[index] = encode_png(thumbnails[index])
                    rows.append({"layer": layer, "feature": feature, "kind": kind.name, "rank": rank,
                                 "image_id": task.images.refs[index].image_id,
                                 "activation": float(top.values[rank, column]), "thumbnail": encoded[index],
                                 "activation_map": top.maps[rank, column].cpu().tolist(),
                                 "grid_rows": rows_, "grid_cols": cols_})
        return pa.Table.from_pylist(rows, schema=EXAMPLE_SLICES.schema)
