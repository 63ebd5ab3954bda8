"""What a record says about its final image besides the objective: descriptors, baselines, an embedding.

The worker measures every record as it makes it; ``vit-atlas describe`` measures the records of an
older store the same way, without re-optimizing. Both start from the record's stored PNG (the 8-bit
image, decoded), so a record measured late holds the numbers it would have had from the sweep:

- the DESCRIPTORS of pipeline.engine.descriptors, ``describe_png(png)``;
- ``activation_noise`` / ``activation_grey``: the unit's objective, through the same truncated score
  function as its ``activation`` (un-augmented, the record's precision), on a uniform-noise image
  U[0, 1) like the optimizer's start, and on a flat image of grey level GREY_LEVEL. The noise is
  seeded from the unit's feature (model, weights, target, objective, layer, feature), not from its
  seed or config, so every record of one feature is held against the same noise;
- ``embedding``: the patch-mean MLP activations at layer EMBEDDING_LAYER (the model's last, if it has
  fewer), of the stored image, in fp32: the model's own description of the image at an early layer,
  what ``descriptors.seed_similarity`` compares between seeds, so readers compute reliability without
  the model.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.engine.descriptors import describe_png
from pipeline.engine.objectives import Objective
from pipeline.engine.visualizer import Visualizer
from pipeline.models.directions import Directions
from pipeline.store.png import decode_png
from pipeline.store.schemas import EMBEDDING_COLUMN

GREY_LEVEL = 0.5
EMBEDDING_LAYER = 1  # the second block: past the patch embedding, before features turn into parts and objects


def noise_seed(model: str, weights_id: str, target: str, objective: str, layer: int, feature: int) -> int:
    """The seed of a feature's noise baseline: the same on every machine, for every seed and config."""
    identity = "|".join(map(str, ("baseline-noise", model, weights_id, target, objective, layer, feature)))
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") >> 1


def noise_image(seed: int, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uniform noise in [0, 1), drawn on the CPU so that it does not depend on the device."""
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


def embedding_layer(visualizer: Visualizer) -> int:
    return min(EMBEDDING_LAYER, len(visualizer.layout.layers) - 1)


def measure(visualizer: Visualizer, layer: int, target: str, objective: Objective, features: list[int],
            pngs: list[bytes], precision: str, directions: Directions | None = None) -> list[dict]:
    """The measured columns of the records of ``features`` (one image each, ``pngs``) at one layer; with
    ``directions``, the features are their rows (the baselines project onto them as the objective did)."""
    if len(features) != len(pngs):
        raise ValueError(f"{len(features)} features but {len(pngs)} images")
    noise, grey = baselines(visualizer, layer, target, objective, features, precision, directions)
    images = torch.stack([torch.from_numpy(np.array(decode_png(png))).permute(2, 0, 1) for png in pngs])
    embeddings = visualizer.pooled_features(images.float() / 255, embedding_layer(visualizer))
    return [{**describe_png(png), "activation_noise": float(noise[i]), "activation_grey": float(grey[i]),
             EMBEDDING_COLUMN: embeddings[i].float().cpu().numpy()} for i, png in enumerate(pngs)]


@torch.no_grad()
def baselines(visualizer: Visualizer, layer: int, target: str, objective: Objective, features: list[int],
              precision: str, directions: Directions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, grey) activations, (F,) each: both references of every feature in one forward pass."""
    size = visualizer.image_size
    seeds = [noise_seed(visualizer.model_name, visualizer.weights.weights_id, target, objective.name, layer, f)
             for f in features]
    noise = torch.stack([noise_image(seed, size) for seed in seeds])
    grey = torch.full_like(noise, GREY_LEVEL)
    images = torch.stack([noise, grey], dim=1).to(visualizer.device)  # (F, 2 "copies", 3, H, W)
    score = visualizer.score(layer, target, objective, features, precision, directions=directions)
    scores = score(images).float().cpu()
    return scores[:, 0], scores[:, 1]
