"""The store's image format: 8-bit RGB PNG, encoded and decoded in one place.

``encode_png`` is how a record's image (and a dataset example's thumbnail) becomes
bytes; ``decode_png`` is how such bytes become pixels again. A float image is quantized
as the sweep's worker always has: clamp to [0, 1], times 255, round half to even (in the
tensor's own precision), uint8. Encoding is Pillow's PNG with its default options, which
are deterministic, so the same pixels always give the same bytes. ``encode_texture_png``
writes the atlas's many thumbnails, where encoding time counts more than a few bytes.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import torch
from isal import isal_zlib
from PIL import Image, UnidentifiedImageError


class PngDecodeError(ValueError):
    """Bytes that are not a decodable PNG image; the message says what was found."""


def encode_png(image: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes of an RGB image.

    ``image``: a float tensor (3, H, W) in [0, 1] (values outside are clamped), or uint8 pixels
    as a tensor or numpy array, channels first (3, H, W) or last (H, W, 3).
    """
    return _encode(_as_uint8_hwc(image))


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of PNG bytes; PngDecodeError if they are not a readable PNG.

    The error's message says what the bytes are instead, as a noun phrase ("not a PNG (...)",
    "a corrupt PNG of N bytes (...)"), to follow "the image is".
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PngDecodeError(f"expected PNG bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise PngDecodeError("an empty image (0 bytes)")
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise PngDecodeError(f"not a PNG ({len(data)} bytes starting {data[:8]!r})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated or corrupt stream fails here, not later
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise PngDecodeError(f"a corrupt PNG of {len(data)} bytes ({type(error).__name__}: {error})") from None


def encode_texture_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of (H, W, 3) uint8 pixels, made for texture at the least CPU: each row Sub-filtered
    (a pixel minus its left neighbour), the stream deflated by ISA-L's igzip at its level 1.

    A feature visualization is mostly noise and fine gratings, where string matching finds few
    repeats and Pillow's per-row choice among PNG's five filters gains little: on 128-px thumbnails
    of such images this is as small as Pillow's Huffman-only PNG, in a twentieth of the time (0.1 ms
    against 2.2 ms here; zlib alone at its fastest, Huffman only, takes 0.8 ms). Pillow lets no one
    choose the filter or the deflater, so the four chunks (signature, IHDR, one IDAT, IEND) are laid
    out here; any PNG decoder reads them.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"encode_texture_png takes (H, W, 3) uint8 pixels; got {pixels.dtype} {pixels.shape}.")
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 1  # filter type Sub
    filtered[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])  # modulo 256, as PNG defines it
    idat = isal_zlib.compress(filtered.data, 1)  # a zlib stream, as PNG's IDAT holds
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _as_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"A float image must be (3, H, W) in [0, 1]; got {tuple(image.shape)}.")
            # The worker's quantization, kept bit for bit: stored images must not change.
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"An integer image must be uint8; got {image.dtype}.")
        array = image.numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"A numpy image must be uint8 (H, W, 3) or (3, H, W); got {image.dtype}.")
        array = image
    else:
        raise TypeError(f"encode_png takes a torch tensor or a numpy array, not {type(image).__name__}.")
    # Channels first is torch's convention, channels last numpy's (and Pillow's); each is tried first.
    channels_first = isinstance(image, torch.Tensor)
    if array.ndim == 3 and array.shape[0 if channels_first else -1] == 3:
        hwc = array.transpose(1, 2, 0) if channels_first else array
    elif array.ndim == 3 and array.shape[-1 if channels_first else 0] == 3:
        hwc = array if channels_first else array.transpose(1, 2, 0)
    else:
        raise ValueError(f"An image must be RGB, (3, H, W) or (H, W, 3); got shape {tuple(array.shape)}.")
    return np.ascontiguousarray(hwc)


def _encode(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
