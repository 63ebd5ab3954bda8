"""The dataset-examples worker: one model, one slice of images, every needed feature at once.

For each batch of images it runs one truncated forward that captures all needed
layers (stopped after the deepest), takes each feature's patch-mean activation
(the sweep's ``mean`` objective) and keeps, per feature, the slice's top-k images
with their activation maps over the patch grid. The driver merges slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from pipeline.analysis import images as images_lib
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.engine.activations import ActivationReader
from pipeline.execution.worker import ModelWorker
from pipeline.store.schemas import EXAMPLE_SLICES

@dataclass(frozen=True)
class ExampleTask:
    part_id: str  # <batch id>-<slice index>
    model: str
    weights: weights_lib.WeightsChoice
    features: tuple[tuple[int, int], ...]  # (layer, feature), sorted
    images: images_lib.ImageSet  # this task's slice
    k: int
    batch_size: int
    thumbnail: int

    @property
    def name(self) -> str:
        return f"unit {self.part_id}"


@dataclass
class _TopK:
    """The best k images of a slice for the features of one layer."""

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
            return (ActivationReader(model, zoo.layout(task.model, task.weights.img_size)),
                    images_lib.Preprocess.from_config(model.pretrained_cfg))

        return self.cached((task.model, task.weights), build)

    @torch.no_grad()
    def run(self, task: ExampleTask) -> pa.Table:
        reader, preprocess = self._reader(task)
        by_layer: dict[int, list[int]] = {}
        for layer, feature in task.features:
            by_layer.setdefault(layer, []).append(feature)
        columns = {layer: torch.tensor(features, device=self.device) for layer, features in by_layer.items()}
        best: dict[int, _TopK] = {}
        thumbnails: list[torch.Tensor] = []
        for start in range(0, len(task.images), task.batch_size):
            stop = min(start + task.batch_size, len(task.images))
            crops = torch.stack([preprocess.crop(task.images.load(i).pixels) for i in range(start, stop)])
            thumbnails.extend(images_lib.thumbnail(crop, task.thumbnail) for crop in crops)
            activations = reader.read_layers(preprocess.normalize(crops.to(self.device)), list(by_layer))
            for layer, tokens in activations.items():
                maps = tokens.index_select(-1, columns[layer]).float().transpose(1, 2)  # (B, F, P)
                values = maps.mean(-1)
                indices = torch.arange(start, stop, device=self.device)[:, None].expand_as(values)
                if layer not in best:
                    best[layer] = _TopK(values[:0], indices[:0], maps[:0])
                best[layer].update(values, indices, maps, task.k)
        return self._rows(task, reader.layout, by_layer, best, thumbnails)

    def _rows(self, task: ExampleTask, layout: zoo.ModelLayout, by_layer: dict[int, list[int]],
              best: dict[int, _TopK], thumbnails: list[torch.Tensor]) -> pa.Table:
        encoded: dict[int, bytes] = {}
        rows = []
        for layer, features in by_layer.items():
            top = best[layer]
            rows_, cols_ = layout.layer(layer).grid
            for column, feature in enumerate(features):
                for rank in range(top.values.shape[0]):
                    index = int(top.indices[rank, column])
                    if index not in encoded:
                        encoded[index] = images_lib.png(thumbnails[index])
                    rows.append({"layer": layer, "feature": feature, "rank": rank,
                                 "image_id": task.images.refs[index].image_id,
                                 "activation": float(top.values[rank, column]), "thumbnail": encoded[index],
                                 "activation_map": top.maps[rank, column].cpu().tolist(),
                                 "grid_rows": rows_, "grid_cols": cols_})
        return pa.Table.from_pylist(rows, schema=EXAMPLE_SLICES.schema)
