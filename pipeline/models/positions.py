"""Absolute position embeddings resampled to another patch grid: for checkpoints (a file, an ONNX export)
loaded into an architecture built at another input size. timm's own ``resample_abs_pos_embed`` does the
work; this module only fixes how, so every importer resamples the same way."""

from __future__ import annotations

import torch
from torch import nn


def resample_position_embedding(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], prefix_tokens: int, old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Position embeddings (1, prefix + rows * cols, dim) resampled to `new_grid`, prefix rows kept.

    As transformers' interpolate_pos_encoding does it (ViT, DeiT, DINOv2): bicubic
    F.interpolate to an explicit size, align_corners=False, no antialiasing (timm's default
    antialias=True would blur when shrinking), in float32. The stored grid is taken as square,
    as transformers does, unless `old_grid` says otherwise."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        pos_embed, new_size=list(new_grid), old_size=list(old_grid) if old_grid else None,
        num_prefix_tokens=prefix_tokens, interpolation="bicubic", antialias=False, align_corners=False,
    )


def fit_position_embedding(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with its ``pos_embed`` resampled to ``model``'s patch grid when the grids differ."""
    wanted = getattr(model, "pos_embed", None)
    found = state.get("pos_embed")
    if wanted is None or found is None or tuple(found.shape) == tuple(wanted.shape):
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = tuple(model.patch_embed.grid_size)
    return {**state, "pos_embed": resample_position_embedding(found.float(), grid, prefix).to(found.dtype)}
