"""Image descriptors of a record's final image, and a few scalar comparisons of units.

Pure functions: no I/O, no state. They give a researcher numbers to test the
paper's claims against ("edges and textures early, objects late"; "ViTs depend
less on high frequencies"):

    describe(image, png=None) -> {name: value}     one image, every DESCRIPTORS entry, in order
    describe_png(png) -> {name: value}             the same from a record's stored PNG bytes
    DESCRIPTORS / descriptor_table()               unit and definition of each, as a Markdown table
    seed_similarity(a, b) / reliability([...])     cosine agreement of a unit's seeds
    reliabilities(vectors, centres)                the same for many units at once
    superstimulus_ratio(...) / baseline_gap(...)   the image's activation against references

What ``describe`` sees
----------------------
The record stores its image as an 8-bit PNG, so a float image is first
quantized exactly as the worker stores it (clamp to [0, 1], x255, round half
to even, uint8): ``describe(tensor)`` equals ``describe`` of the decoded PNG.
Accepted inputs: a float torch tensor (3, H, W) in [0, 1], or a uint8 numpy
array (H, W, 3) in 0..255 (what ``np.asarray(Image.open(...).convert("RGB"))``
gives). H and W may differ; the images are usually 224 x 224.

*Grey* is the BT.601 luma of the gamma-encoded values,
Y' = 0.299 R' + 0.587 G' + 0.114 B', in [0, 1] -- the weights of Pillow's
``convert("L")`` and OpenCV's ``cvtColor`` (computed in float here, not rounded).

No window, circular boundaries. The optimizer scores circularly shifted copies
(jitter up to 32 px) and its total-variation term is taken on those copies, so
the wrap-around seam lies inside what the model and the smoothness prior see:
the image is optimized as a torus, and its periodic extension is the image
itself. The DFT's own periodicity is therefore the right model and a window
(Hann etc.) would only do harm: it smears every spectral line over neighbouring
bins and down-weights the border pixels, which are as much part of the image
as the centre. For the same reason the Sobel filter wraps around. Caveat: a
natural photograph is *not* periodic; its border seam adds power along the
frequency axes (and edge pixels at the border), so compare natural images only
with that in mind (or describe crops of periodic content).

Spectrum conventions: power P(k) = |DFT(g - mean g)(k)|^2 over every bin of the
full H x W DFT except DC; the bin's radial frequency is
r = sqrt((kx / W)^2 + (ky / H)^2) in cycles per pixel, so 0 < r <= sqrt(2)/2
(axis Nyquist 0.5, diagonal corners up to 0.707). All bins are kept, corners
included, so the non-DC power is exactly the grey variance (Parseval) and the
shares below are shares of the image's variance. ``spectral_centroid`` is the
power-weighted mean of r over those bins, i.e. the centroid of the *radially
integrated* spectrum (the radially averaged spectrum weighted by how many bins
each annulus holds): the mean frequency of a unit of the image's variance.
The unweighted centroid of the radially averaged profile was not used because
it counts the few bins of a low-frequency annulus as much as the many of a high
one, and would not be the mean of the same distribution whose upper tail is
``high_frequency_share``. A flat (constant-grey) image has no non-DC power, so
both spectral descriptors are NaN there ("undefined"), not 0, so that they do not
pull averages toward "low frequency"; pandas' mean skips NaN. The cut-off 0.25
cycles/pixel (inclusive) is half the axis Nyquist: the top octave of the grid,
periods of 4 px or less, well below the 14-16 px patch size of the models.

Edges: the Sobel response divided by 8 is a gradient in grey levels (0-1) per
pixel (a ramp of slope s gives s; a one-pixel step of contrast c gives c/2 on
both its sides). EDGE_THRESHOLD = 0.1 thus calls a one-pixel step of more than
20 % of the grey range (51 of 255 levels) an edge; a full-contrast grating has
edges when its period is under 2 pi / asin(0.2) = 31 px and is pure shading
above; uniform RGB noise (grey sd 0.19) is about half edge pixels. A fixed
threshold, not one adapted to the image (Otsu, a percentile), so that a
low-contrast image has fewer edges rather than the same share.

Resolution: frequencies are per pixel, edge density is a share of pixels and
PNG size grows with the pixel count, as the optimizer works per pixel at the
model's native size. The same layout at 384 px has lower frequencies, fewer
edge pixels per pixel and more bytes than at 224 px: compare models of
different native sizes after resizing to one size, or within a size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch

from pipeline.store.png import decode_png, encode_png

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 on gamma-encoded R'G'B', as Pillow's "L"
HIGH_FREQUENCY_CUTOFF = 0.25  # cycles/pixel, inclusive: periods of 4 px or shorter (the grid's top octave)
EDGE_THRESHOLD = 0.1  # grey levels per pixel of the normalized Sobel magnitude (Sobel / 8)
COLOURFULNESS_MEAN_WEIGHT = 0.3  # Hasler & Suesstrunk (2003), M3
_FLAT_VARIANCE = 1e-20  # rounding noise is ~1e-32; one pixel 1/255 of blue off in a 1024 px image is ~2e-16


class Descriptor(NamedTuple):
    unit: str
    definition: str


DESCRIPTORS: Mapping[str, Descriptor] = MappingProxyType({
    "spectral_centroid": Descriptor(
        "cycles/pixel",
        "Power-weighted mean radial frequency of the grey image's non-DC DFT bins, no window "
        "(0 to 0.707; NaN if flat)"),
    "high_frequency_share": Descriptor(
        "fraction",
        f"Share of the grey image's non-DC power at radial frequency >= {HIGH_FREQUENCY_CUTOFF} "
        f"cycles/pixel, periods of 4 px or less (0 to 1; NaN if flat)"),
    "edge_density": Descriptor(
        "fraction",
        f"Share of pixels whose Sobel gradient magnitude of the grey image, divided by 8 and with "
        f"wrap-around borders, exceeds {EDGE_THRESHOLD} per pixel (a one-pixel step of contrast > "
        f"{2 * EDGE_THRESHOLD:g} is an edge)"),
    "rms_contrast": Descriptor(
        "grey level (0-1)",
        "Standard deviation of the grey image (BT.601 luma, 0 to 1); 0 for a flat image"),
    "colourfulness": Descriptor(
        "M3 (0-255 RGB)",
        "Hasler & Suesstrunk (2003) M3 on 0-255 sRGB: sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mean_rg^2 + "
        "mean_yb^2), rg = R - G, yb = (R + G) / 2 - B, signed"),
    "png_bytes": Descriptor(
        "bytes",
        "Size of the record's PNG (Pillow's default encoder: zlib level 6), a compressibility proxy"),
})


def descriptor_table(descriptors: Mapping[str, Descriptor] = DESCRIPTORS) -> str:
    """A Markdown table of the descriptors: name, unit, definition, in DESCRIPTORS order."""
    lines = ["| name | unit | definition |", "| --- | --- | --- |"]
    for name, (unit, definition) in descriptors.items():
        cells = (f"`{name}`", unit, definition)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def describe(image: torch.Tensor | np.ndarray, png: bytes | None = None) -> dict[str, float]:
    """Every descriptor of one image, keyed and ordered as DESCRIPTORS; all values are floats.

    ``image``: a float tensor (3, H, W) in [0, 1] (quantized to 8 bits as the worker stores it), or
    a uint8 numpy array (H, W, 3). ``png``: the record's stored PNG bytes, whose length is then
    ``png_bytes``; without them the image is encoded as the worker does (``pipeline.store.png.encode_png``:
    Pillow's defaults, which are deterministic), giving the same size.
    """
    rgb = _as_uint8_hwc(image)
    grey = _grey(rgb)
    centred = grey - grey.mean()
    variance = float(np.mean(centred * centred))
    flat = variance < _FLAT_VARIANCE
    centroid, high_share = (math.nan, math.nan) if flat else _spectral(centred)
    return {
        "spectral_centroid": centroid,
        "high_frequency_share": high_share,
        "edge_density": _edge_density(grey),
        "rms_contrast": 0.0 if flat else math.sqrt(variance),
        "colourfulness": _colourfulness(rgb),
        "png_bytes": float(len(png) if png is not None else len(encode_png(rgb))),
    }


def describe_png(png: bytes) -> dict[str, float]:
    """``describe`` of a record's stored image, from its PNG bytes (decoded in memory, as RGB)."""
    return describe(decode_png(png), png=png)


def _as_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"A tensor image must be float (3, H, W) in [0, 1]; got {image.dtype} "
                             f"{tuple(image.shape)}.")
        image = image.detach().cpu()
        if image.dtype not in (torch.float32, torch.float64):
            image = image.float()
        values = image.numpy()
        if not np.isfinite(values).all():
            raise ValueError("The image holds non-finite values.")
        # The worker's quantization (pipeline.store.png.encode_png: clamp, x255, round half to even, in the
        # tensor's precision; half types as float32), in numpy: small torch ops are slow on a busy CPU.
        scaled = np.round(np.clip(values, 0, 1) * values.dtype.type(255))
        rgb = scaled.astype(np.uint8).transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"A numpy image must be uint8 (H, W, 3); got {image.dtype} {image.shape}.")
        rgb = image
    else:
        raise TypeError(f"describe takes a float torch tensor (3, H, W) or a uint8 numpy array (H, W, 3), "
                        f"not {type(image).__name__}.")
    if rgb.shape[0] < 3 or rgb.shape[1] < 3:
        raise ValueError(f"The image must be at least 3 x 3 pixels; got {rgb.shape[0]} x {rgb.shape[1]}.")
    return np.ascontiguousarray(rgb)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float64 BT.601 luma in [0, 1]."""
    r, g, b = LUMA_WEIGHTS
    channels = rgb.astype(np.float64)
    return (r * channels[..., 0] + g * channels[..., 1] + b * channels[..., 2]) / 255.0


def _radial_frequency(height: int, width: int) -> np.ndarray:
    """(H, W) radial frequency in cycles/pixel of each bin of numpy's fft2 layout."""
    return np.hypot(_frequencies(height)[:, None], _frequencies(width)[None, :])


def _frequencies(n: int) -> np.ndarray:
    """np.fft.fftfreq(n) as integer bin index / n, so 56 / 224 is exactly 0.25."""
    index = np.concatenate([np.arange(0, (n + 1) // 2), np.arange(-(n // 2), 0)])
    return index / n


def _spectral(centred: np.ndarray) -> tuple[float, float]:
    """(spectral_centroid, high_frequency_share) of a mean-removed grey image that is not flat."""
    power = np.abs(np.fft.fft2(centred)) ** 2
    power[0, 0] = 0.0  # DC: zero after removing the mean, up to rounding; excluded by definition
    radius = _radial_frequency(*centred.shape)
    total = power.sum()
    centroid = float((power * radius).sum() / total)
    high = float(power[radius >= HIGH_FREQUENCY_CUTOFF * (1 - 1e-12)].sum() / total)
    return centroid, high


def _edge_density(grey: np.ndarray) -> float:
    """Share of pixels whose Sobel magnitude / 8 exceeds EDGE_THRESHOLD, borders wrapping around."""
    down, up = np.roll(grey, 1, axis=0), np.roll(grey, -1, axis=0)
    vertical_smooth = down + 2 * grey + up
    horizontal_smooth = np.roll(grey, 1, axis=1) + 2 * grey + np.roll(grey, -1, axis=1)
    # Divided by 8, a ramp of slope s gives |gradient| = s and a unit step 0.5 on its two sides.
    gx = (np.roll(vertical_smooth, -1, axis=1) - np.roll(vertical_smooth, 1, axis=1)) / 8.0
    gy = (np.roll(horizontal_smooth, -1, axis=0) - np.roll(horizontal_smooth, 1, axis=0)) / 8.0
    return float(np.mean(np.hypot(gx, gy) > EDGE_THRESHOLD))


def _colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) M3 on 0..255 values, with signed opponents and population statistics.

    Popular re-implementations take |R - G| and |yb|; the paper's opponent axes are signed (a red/green
    image is colourful by its spread, not by a mean), and that is what is computed here.
    """
    channels = rgb.astype(np.float64)
    red, green, blue = channels[..., 0], channels[..., 1], channels[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = math.hypot(float(rg.std()), float(yb.std()))
    offset = math.hypot(float(rg.mean()), float(yb.mean()))
    return spread + COLOURFULNESS_MEAN_WEIGHT * offset


# --- agreement of a unit's seeds ------------------------------------------------------------------


def _vector(values, name: str) -> torch.Tensor:
    vector = torch.as_tensor(values).detach().cpu().to(torch.float64).flatten()
    if vector.numel() == 0:
        raise ValueError(f"{name} is empty.")
    return vector


def _centred(vector: torch.Tensor, center, name: str) -> torch.Tensor:
    if center is None:
        return vector
    reference = _vector(center, "center")
    if reference.shape != vector.shape:
        raise ValueError(f"center has {reference.numel()} values but {name} has {vector.numel()}.")
    return vector - reference


def seed_similarity(features_a, features_b, *, center=None) -> float:
    """Cosine similarity a.b / (|a| |b|) of two pooled feature vectors (any shape, flattened, float64).

    The caller passes a model's own pooled features (e.g. the patch-mean of an early layer) of two
    seeds' images. Pooled ViT features share a large common component, so two unrelated images
    already score well above 0: compare against unrelated pairs, or pass ``center`` (e.g. the mean
    pooled feature of many images at that layer), which is subtracted from both first. NaN if
    either vector is zero.
    """
    a = _centred(_vector(features_a, "features_a"), center, "features_a")
    b = _centred(_vector(features_b, "features_b"), center, "features_b")
    if a.shape != b.shape:
        raise ValueError(f"The feature vectors differ in length: {a.numel()} and {b.numel()}.")
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else math.nan


def reliability(vectors: Sequence, *, center=None) -> float:
    """Mean cosine similarity over all unordered pairs of a unit's seeds' pooled feature vectors.

    1 when every seed's image gives the same direction, 0 for mutually orthogonal ones, -1 for two
    opposite ones. NaN for fewer than 2 vectors (undefined, not "unreliable"), and NaN if any is zero.
    ``center`` as in :func:`seed_similarity`.
    """
    if len(vectors) < 2:
        return math.nan
    rows = [_vector(v, f"vectors[{i}]") for i, v in enumerate(vectors)]
    if len({row.numel() for row in rows}) != 1:
        raise ValueError(f"The vectors differ in length: {sorted({row.numel() for row in rows})}.")
    centres = None
    if center is not None:
        reference = _vector(center, "center")
        if reference.shape != rows[0].shape:
            raise ValueError(f"center has {reference.numel()} values but vectors[0] has {rows[0].numel()}.")
        centres = reference.numpy()[None]
    return float(reliabilities(torch.stack(rows).numpy()[None], centres)[0])


def reliabilities(vectors: np.ndarray, centres: np.ndarray | None = None) -> np.ndarray:
    """:func:`reliability` of many units at once, in float64: ``vectors`` (units, seeds, width) with
    at least 2 seeds each, ``centres`` (units, width) or None; returns (units,). A store's atlas
    measures tens of thousands of units: one call for all of them instead of one per unit."""
    stacked = np.array(vectors, dtype=np.float64)  # a copy: centred in place
    if stacked.ndim != 3 or stacked.shape[1] < 2:
        raise ValueError(f"reliabilities takes (units, seeds >= 2, width) vectors; got shape {stacked.shape}.")
    if centres is not None:
        stacked -= np.asarray(centres, dtype=np.float64)[:, None, :]
    # Cosines from the Gram matrix of each unit's seeds: one pass over the vectors, none to normalize them
    gram = np.einsum("usd,utd->ust", stacked, stacked)
    norms = np.sqrt(np.einsum("uss->us", gram))
    first, second = np.triu_indices(stacked.shape[1], k=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero vector: that unit is NaN, below
        means = (gram[:, first, second] / (norms[:, first] * norms[:, second])).mean(axis=1)
    means[(norms == 0).any(axis=1)] = math.nan
    return means


# --- activation against references ----------------------------------------------------------------


def superstimulus_ratio(activation: float, top_natural: float, baseline: float | None = None) -> float:
    """How far the synthesized image drives the unit relative to its most activating natural image.

    Without ``baseline``: activation / top_natural; > 1 means the image is a superstimulus, beyond
    every natural image tried. A ratio is only meaningful on a scale whose zero means "nothing", so it
    is NaN when top_natural <= 0. With ``baseline`` (e.g. :func:`baseline_gap`'s max of the noise and
    grey activations): (activation - baseline) / (top_natural - baseline), which is invariant to the
    unit's scale *and* offset (0: no better than the trivial inputs, 1: as good as the best natural
    image); NaN when top_natural <= baseline.
    """
    reference = 0.0 if baseline is None else float(baseline)
    denominator = float(top_natural) - reference
    if not denominator > 0:
        return math.nan
    return (float(activation) - reference) / denominator


def baseline_gap(activation: float, noise: float, grey: float) -> float:
    """activation - max(noise, grey): what the optimization added over the two trivial inputs.

    ``noise`` and ``grey`` are the same objective on a uniform-noise image (the optimizer's start)
    and on a flat mid-grey image. In the unit's own activation units, so compare across units only
    through ``superstimulus_ratio(activation, top_natural, baseline=max(noise, grey))``.
    """
    return float(activation) - max(float(noise), float(grey))
