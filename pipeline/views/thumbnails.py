"""The atlas's small images: texture-keeping thumbnails, the placeholder of an unreadable image, and dataset
examples with their activation map laid over them."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import PipelineError
from pipeline.store.png import decode_png, encode_png

THUMB_SIZE = 128  # thumbnail side, and the size grids show them at (1:1, so browsers do not average either)
EXAMPLE_SIZE = 128


def thumbnail_pixels(pixels: np.ndarray, size: int | None = None) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail of (H, W, 3) pixels that keeps their texture: no averaging at all.

    A side of at most ``size`` is kept as it is (browsers scale it up, pixelated); a larger image is
    subsampled by nearest neighbour, so every thumbnail pixel is a pixel of the image. Averaging
    filters (box, Lanczos, JPEG's chroma subsampling) turn the per-pixel noise and fine gratings of
    feature visualizations into flat grey; subsampling keeps their contrast (and aliases the finest
    patterns, which still reads as texture).
    """
    size = size or THUMB_SIZE
    height, width = pixels.shape[:2]
    if max(height, width) <= size:
        return pixels
    scale = size / max(height, width)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.NEAREST))


@functools.cache
def placeholder_thumbnail() -> bytes:
    """A grey tile with a dark border and a cross: plainly not a visualization."""
    tile = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (205, 205, 205))
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, THUMB_SIZE - 1, THUMB_SIZE - 1), outline=(90, 90, 90), width=3)
    draw.line((0, 0, THUMB_SIZE - 1, THUMB_SIZE - 1), fill=(170, 40, 40), width=3)
    draw.line((0, THUMB_SIZE - 1, THUMB_SIZE - 1, 0), fill=(170, 40, 40), width=3)
    return encode_png(np.asarray(tile))


def example_overlay(example: dict) -> Image.Image:
    """The example image with its activation map laid over it in red, brighter where the feature fires."""
    rows, cols, values = example["grid_rows"], example["grid_cols"], example["activation_map"]
    if rows * cols != len(values):
        raise PipelineError(
            f"The dataset example {example['image_id']!r} of {example['key']!r} has an activation map of "
            f"{len(values)} values for a {rows}x{cols} grid. Each map must hold grid_rows * grid_cols values, "
            "row by row; fix the examples table."
        )
    image = Image.fromarray(decode_png(example["thumbnail"]))
    image.thumbnail((EXAMPLE_SIZE, EXAMPLE_SIZE), Image.Resampling.LANCZOS)
    heat = np.asarray(values, dtype=np.float64).reshape(rows, cols)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    alpha = Image.fromarray((heat * 160).astype(np.uint8), mode="L").resize(image.size, Image.Resampling.BILINEAR)
    red = Image.new("RGB", image.size, (255, 32, 0))
    return Image.composite(red, image, alpha)
