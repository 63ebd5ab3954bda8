"""Objectives: how one feature's patch-token activations become the scalar to maximize.

An objective maps a feature's activations over the image patches, shaped
(..., patches), to one score per image, shaped (...). Each is self-describing:
its ``name`` goes into every record and into the unit key, and
:func:`parse_objective` reads that name back, so a record says exactly what
was optimized.

- ``mean``: the paper's objective, the mean over image-patch tokens (CLS and
  distillation tokens are excluded before the objective sees the tokens).
- ``position-<row>-<col>``: one patch position of the grid, for spatial studies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class PatchMean:
    name: str = "mean"

    def __call__(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return patches.mean(dim=-1)


@dataclass(frozen=True)
class PatchPosition:
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"position-{self.row}-{self.col}"

    def __call__(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return patches[..., self.row * grid[1] + self.col]


Objective = PatchMean | PatchPosition

_POSITION = re.compile(r"position-(\d+)-(\d+)")


def parse_objective(spec: str) -> Objective:
    if spec == "mean":
        return PatchMean()
    match = _POSITION.fullmatch(str(spec))
    if match:
        return PatchPosition(int(match[1]), int(match[2]))
    raise PipelineError(
        f"Unknown objective '{spec}': use 'mean' (mean over image patches, the paper's) or "
        f"'position-ROW-COL' (one patch of the layer's grid, e.g. position-7-7)."
    )


def check_objective(objective: Objective, grid: tuple[int, int], where: str) -> None:
    if isinstance(objective, PatchPosition) and not (objective.row < grid[0] and objective.col < grid[1]):
        raise PipelineError(
            f"Objective {objective.name} lies outside the {grid[0]}x{grid[1]} patch grid of {where}: "
            f"rows are 0..{grid[0] - 1}, columns 0..{grid[1] - 1}."
        )
