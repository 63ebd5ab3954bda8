"""The engine: one loaded model turned into scores the optimizer can maximize.

A :class:`Visualizer` holds a model (loaded once, frozen, on an explicit
device) and, per request, composes model input normalization, the truncated
activation reader, feature selection (a channel, or the projection onto a
direction: pipeline.models.directions) and an objective into a *score*
(images -> one scalar per image) for :func:`pipeline.engine.optimize.visualize`.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch

from pipeline.config import OptimConfig
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.models.directions import Directions
from pipeline.engine import calibrate
from pipeline.engine.calibrate import PRECISIONS
from pipeline.engine.activations import ActivationReader
from pipeline.engine.objectives import Objective, check_objective
from pipeline.engine.optimize import Visualization, visualize


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Visualizer:
    def __init__(self, model_name: str, weights: weights_lib.WeightsChoice, device: torch.device):
        self.model_name = model_name
        self.weights = weights
        self.device = device
        self.layout = zoo.layout(model_name, weights.img_size)
        self.model = weights_lib.load(model_name, weights, device)
        self.reader = ActivationReader(self.model, self.layout)
        self._mean = torch.tensor(self.layout.mean, device=device).view(3, 1, 1)
        self._std = torch.tensor(self.layout.std, device=device).view(3, 1, 1)
        self._precisions: dict[str, calibrate.PrecisionChoice] = {}

    def precision(self, requested: str, layer: int, target: str, objective: Objective,
                  optim: OptimConfig, directions: Directions | None = None) -> calibrate.PrecisionChoice:
        """``requested`` (auto | fp32 | bf16 | fp16) as measured on this device for this model, once per
        visualizer: every chunk a worker runs with it uses the same choice (pipeline.engine.calibrate), timing
        a step of ``optim``'s."""
        if requested not in self._precisions:
            self._precisions[requested] = calibrate.choose_precision(self, requested, layer, target, objective, optim,
                                                                     directions)
        return self._precisions[requested]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.layout.input_size[1], self.layout.input_size[2]

    def score(self, layer: int, target: str, objective: Objective, features: list[int], precision: str = "fp32",
              truncate: bool = True, directions: Directions | None = None):
        """images (F, copies, 3, H, W) in [0, 1] -> (F, copies): feature i scored on image i, in ``precision``
        (fp32 | bf16 | fp16: :meth:`precision` resolves auto). With ``directions``, feature i is row i of them,
        projected onto per token (in fp32) before the objective.

        ``truncate=False`` runs every block, as the released code does; the benchmark's reference uses it.
        """
        if directions is None:
            self.layout.check_features(layer, target, features)
            index = torch.tensor(features, device=self.device)
        else:
            self.layout.site(layer, target)  # the layer and target exist; the plan checked the directions' width
            project = directions.projection(features, self.device)
        grid = self.layout.layer(layer).grid
        check_objective(objective, grid, f"layer {layer} of {self.model_name}")
        dtype = PRECISIONS[precision]

        def score(images: torch.Tensor) -> torch.Tensor:
            count, copies = images.shape[:2]
            normalized = self.normalize(images).flatten(0, 1)
            with torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext():
                patches = self.reader(normalized, layer, target, truncate)  # (F * copies, P, C)
            patches = patches.float().unflatten(0, (count, copies))
            if directions is not None:
                return objective(project(patches), grid)
            chosen = patches.gather(3, index.view(count, 1, 1, 1).expand(count, copies, patches.shape[2], 1))
            return objective(chosen.squeeze(3), grid)

        return score

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (..., 3, H, W) as the model takes them: its mean and std per channel."""
        return (images - self._mean) / self._std

    @torch.no_grad()
    def pooled_features(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] -> (N, C) float32 on the CPU: the patch-mean MLP activations at
        ``layer``, every channel, in fp32 (a description of the image by the model, not an objective)."""
        return self.reader(self.normalize(images.to(self.device)), layer, "mlp").float().mean(dim=1).cpu()

    def run(self, layer: int, target: str, objective: Objective, features: list[int], seeds: list[int],
            config: OptimConfig, directions: Directions | None = None) -> Visualization:
        if config.precision == "auto":
            chosen = self.precision("auto", layer, target, objective, config, directions).used
            config = dataclasses.replace(config, precision=chosen)
        score = self.score(layer, target, objective, features, config.precision, directions=directions)
        return visualize(score, seeds, self.image_size, config, self.device)
