"""MACO magnitude spectra as files: ``vit-atlas spectrum`` writes one, ``optim.param.spectrum=FILE`` (``optim.param=maco``) reads it.

A spectrum file is a ``.npy`` or ``.safetensors`` array of (3, H, W // 2 + 1) float32
magnitudes (or one (H, W // 2 + 1) channel for all three), averaged over a folder of
images by :func:`spectrum_from_folder`. Records cite a file by its sha256
(:func:`file_sha256`), so a file is written once and never replaced silently.
:func:`load_spectrum` reads one back at any image size; the optimization maths that
uses it lives in pipeline.engine.parameterizations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError

SPECTRUM_SUFFIXES = (".npy", ".safetensors")
_METADATA_KEY = "maco_spectrum"  # safetensors metadata: JSON with height, width, images
POWERLAW = "powerlaw"  # optim.param.spectrum's value for the power law instead of a file


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_spectrum_file(path: str | os.PathLike) -> tuple[np.ndarray, int | None]:
    """(C, h, w // 2 + 1) float array and the source width, if the file records it."""
    path = Path(path)
    usage = (f"optim.param.spectrum is '{POWERLAW}' or a {' / '.join(SPECTRUM_SUFFIXES)} file written by "
             f"`vit-atlas spectrum folder=DIR out=OUT.npy`")
    if path.suffix not in SPECTRUM_SUFFIXES:
        raise PipelineError(f"MACO spectrum {str(path)!r} is not a {' or '.join(SPECTRUM_SUFFIXES)} file: {usage}.")
    if not path.is_file():
        raise PipelineError(f"MACO spectrum file {str(path)!r} does not exist: {usage}.")
    width = None
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                keys = list(handle.keys())
                if len(keys) != 1:
                    raise ValueError(f"expected one tensor, found {keys}")
                array = handle.get_tensor(keys[0])
                width = json.loads((handle.metadata() or {}).get(_METADATA_KEY, "{}")).get("width")
    except (OSError, ValueError) as error:
        raise PipelineError(f"Cannot read MACO spectrum {str(path)!r} ({error}): {usage}.") from None
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = np.broadcast_to(array, (3, *array.shape))
    if array.ndim != 3 or array.shape[0] not in (1, 3) or min(array.shape[1:]) < 1:
        raise PipelineError(f"MACO spectrum {str(path)!r} has shape {array.shape}; expected (H, W//2+1) or "
                            f"(3, H, W//2+1) magnitudes: {usage}.")
    if not np.isfinite(array).all() or (array < 0).any():
        raise PipelineError(f"MACO spectrum {str(path)!r} holds negative or non-finite magnitudes: {usage}.")
    return np.broadcast_to(array, (3, *array.shape[1:])).copy(), width


def load_spectrum(path: str | os.PathLike, image_size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W // 2 + 1) magnitudes from a ``.npy`` / ``.safetensors`` file, resampled to ``image_size``.

    A file for another size is resampled bilinearly in frequency (cycles per pixel), not in
    array index, so each bin keeps its physical frequency; the self-paired columns are then
    made mirror-symmetric, as a real image's spectrum is.
    """
    array, width = read_spectrum_file(path)
    magnitude = torch.from_numpy(array)
    source_h, source_wr = magnitude.shape[1:]
    source_w = width or 2 * (source_wr - 1)
    height, target_w = image_size
    if (source_h, source_w) != (height, target_w):
        magnitude = _resample(magnitude, (source_h, source_w), image_size)
    return _symmetrize(magnitude, target_w)


def _resample(magnitude: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    source_h, source_w = source
    shifted = torch.fft.fftshift(magnitude, dim=-2)  # row r <-> f_y = (r - h // 2) / h
    rows = torch.fft.fftfreq(target[0])[:, None] * source_h + source_h // 2
    cols = torch.fft.rfftfreq(target[1])[None, :] * source_w
    rows, cols = torch.broadcast_tensors(rows, cols)
    grid = torch.stack([2 * cols / max(1, shifted.shape[-1] - 1) - 1, 2 * rows / max(1, source_h - 1) - 1], dim=-1)
    return torch.nn.functional.grid_sample(shifted[None], grid[None].float(), mode="bilinear",
                                           padding_mode="border", align_corners=True)[0]


def _symmetrize(magnitude: torch.Tensor, width: int) -> torch.Tensor:
    height = magnitude.shape[-2]
    mirror = (-torch.arange(height)) % height
    out = magnitude.clone()
    for column in [0] + ([width // 2] if width % 2 == 0 and width > 1 else []):
        out[..., column] = (magnitude[..., column] + magnitude[..., mirror, column]) / 2
    return out.contiguous()


def _load_rgb(path: Path, image_size: tuple[int, int]) -> torch.Tensor | None:
    """(3, H, W) in [0, 1]: shorter side resized to cover the size, centre-cropped; None if PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            height, width = image_size
            scale = max(height / image.height, width / image.width)
            resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(resized, Image.Resampling.BICUBIC)
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def spectrum_from_folder(folder: str | os.PathLike, out: str | os.PathLike,
                         decorrelate: Callable[[torch.Tensor], torch.Tensor], image_size: tuple[int, int] = (224, 224),
                         overwrite: bool = False, progress: Callable[[str], None] | None = None) -> str:
    """Average magnitude spectrum of the images under ``folder``, written to ``out``; returns its id.

    Every file under ``folder`` (recursively, sorted) that PIL can read is converted to
    RGB, resized and centre-cropped to ``image_size``, taken by ``decorrelate`` to the
    colour space MACO optimizes in (``parameterizations.decorrelate``), and its real FFT's
    magnitude averaged per channel: a (3, H, W // 2 + 1) float32 array. The file is
    written once: an existing ``out`` is an error unless ``overwrite``, since records
    cite it by its sha256.
    """
    folder, out = Path(folder), Path(out)
    if out.suffix not in SPECTRUM_SUFFIXES:
        raise PipelineError(f"Spectrum output {str(out)!r} must end in {' or '.join(SPECTRUM_SUFFIXES)}.")
    if out.exists() and not overwrite:
        raise PipelineError(f"Spectrum file {str(out)!r} exists; records may cite it by its sha256. "
                            f"Write to a new path, or set force=true to replace it.")
    if not folder.is_dir():
        raise PipelineError(f"Image folder {str(folder)!r} is not a directory.")
    total = torch.zeros(3, image_size[0], image_size[1] // 2 + 1, dtype=torch.float64)
    count = skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        pixels = _load_rgb(path, image_size)
        if pixels is None:
            skipped += 1
            continue
        total += torch.fft.rfft2(decorrelate(pixels)).abs()
        count += 1
    if count == 0:
        raise PipelineError(f"No image PIL can read under {str(folder)!r} ({skipped} other files).")
    magnitude = (total / count).float().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial" + out.suffix)
    if out.suffix == ".npy":
        np.save(partial, magnitude, allow_pickle=False)
    else:
        from safetensors.numpy import save_file

        # One metadata key: safetensors writes a multi-key metadata map in no fixed order, and the
        # file's bytes must not change between two runs on the same images.
        about = json.dumps({"height": image_size[0], "width": image_size[1], "images": count}, sort_keys=True)
        save_file({"magnitude": magnitude}, str(partial), metadata={_METADATA_KEY: about})
    os.replace(partial, out)
    if progress:
        progress(f"{count} images ({skipped} unreadable files skipped) -> {out}")
    return f"sha256-{file_sha256(out)}"

