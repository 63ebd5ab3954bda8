"""The store's one PNG encoder and decoder (pipeline/store/png.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.store.png import PngDecodeError, decode_png, encode_png, encode_texture_png


def _pillow_png(hwc: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_float_image_is_quantized_and_encoded_as_the_worker_always_did():
    torch.manual_seed(0)
    image = torch.rand(3, 20, 30) * 1.4 - 0.2  # values outside [0, 1] are clamped
    image[0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255])  # halves round to even
    # The worker's encoder before this module existed, verbatim: stored images must not change.
    old = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert encode_png(image) == _pillow_png(np.ascontiguousarray(old))
    decoded = decode_png(encode_png(image))
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, old)


def test_uint8_images_channels_first_or_last_give_the_same_png():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    expected = _pillow_png(hwc)
    assert encode_png(hwc) == expected
    assert encode_png(chw) == expected
    assert encode_png(torch.from_numpy(chw)) == expected
    assert encode_png(torch.from_numpy(hwc)) == expected
    assert np.array_equal(decode_png(expected), hwc)


def test_decode_gives_rgb_whatever_the_png_mode():
    grey = io.BytesIO()
    Image.new("L", (4, 3), 77).save(grey, format="PNG")
    rgba = io.BytesIO()
    Image.new("RGBA", (2, 2), (10, 20, 30, 40)).save(rgba, format="PNG")
    assert decode_png(grey.getvalue()).shape == (3, 4, 3) and (decode_png(grey.getvalue()) == 77).all()
    assert decode_png(rgba.getvalue())[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("bad, what", [
    (b"", "empty"),
    (b"GIF89a not a png", "not a PNG"),
    (encode_png(np.zeros((64, 64, 3), np.uint8) + 3)[:40], "corrupt PNG"),  # cut mid-stream
    (encode_png(np.zeros((8, 8, 3), np.uint8))[:8] + b"\x00" * 50, "corrupt PNG"),  # signature, then junk
])
def test_bad_bytes_raise_a_clear_error(bad, what):
    with pytest.raises(PngDecodeError, match=what):
        decode_png(bad)


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.zeros(4, 5, 5), torch.zeros(3, 4, 4, dtype=torch.int32),
                                 np.zeros((4, 4, 3)), np.zeros((4, 4), np.uint8), [[0]]])
def test_encode_rejects_what_is_not_an_rgb_image(bad):
    with pytest.raises((TypeError, ValueError)):
        encode_png(bad)


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 77, 3), (128, 128, 3)])
def test_a_texture_png_decodes_to_exactly_its_pixels_with_pillow(shape):
    pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    pixels[0, : min(4, shape[1])] = [[255, 0, 1]] * min(4, shape[1])  # left neighbours that wrap modulo 256
    data = encode_texture_png(pixels)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # Pillow checks each chunk's CRC as it reads
        assert image.mode == "RGB" and image.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(image), pixels)
    # noise costs what Pillow's default costs, give or take a few percent: no bytes are wasted
    assert len(data) < 1.05 * len(_pillow_png(pixels))


def test_a_texture_png_refuses_what_is_not_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        encode_texture_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        encode_texture_png(np.zeros((4, 4), np.uint8))
