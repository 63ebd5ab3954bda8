"""Natural images for the probes and dataset examples: timm's eval transform, its geometry, and tar streaming."""

from __future__ import annotations

import builtins
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline  # noqa: F401  (before timm)
from pipeline.analysis import images as images_lib
from pipeline.errors import PipelineError
from tests.analysis_fixtures import save_image

# deit_tiny: bicubic, crop_pct 0.875 (resize 248, crop 224); the CLIP tower: crop_pct 1.0, OpenAI mean/std
MODELS = ("deit_tiny_patch16_224", "vit_base_patch32_clip_224.openai")


def _meta_model(name: str):
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("model_name", MODELS)
def test_the_crop_and_normalization_are_timms_eval_transform(tmp_path, model_name):
    import timm.data

    model = _meta_model(model_name)
    preprocess = images_lib.Preprocess.for_model(model)
    timm_transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    rng = np.random.default_rng(1)
    for i, (height, width) in enumerate(((333, 250), (180, 401), (224, 224), (97, 130))):
        y, x = np.mgrid[0:height, 0:width]
        array = 0.5 + 0.3 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None] + 0.1 * rng.standard_normal(
            (height, width, 3))
        save_image(tmp_path / "c" / f"img{i}.png", array)
    image_set = images_lib.open_images(str(tmp_path))
    for image in image_set.images():
        ours = preprocess.normalize(preprocess.crop(image.pixels)[None])[0]
        theirs = timm_transform(Image.open(image.ref.source).convert("RGB"))
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), (image.ref.image_id, (ours - theirs).abs().max())


def _marker_position(crop: torch.Tensor, background: float) -> tuple[float, float]:
    """Centroid (x, y) of a one-pixel marker after resampling, in crop pixel-edge coordinates.

    Padding (exact zeros, where a crop is larger than the resized image) carries no signal.
    """
    signal = torch.where(crop == 0, 0.0, crop - background).mean(0).double()
    signal[signal.abs() < 1.5 / 255] = 0  # the background, quantized to 8 bits, is not quite ``background``
    ys, xs = torch.meshgrid(torch.arange(crop.shape[1]), torch.arange(crop.shape[2]), indexing="ij")
    total = signal.sum()
    return float((signal * xs).sum() / total) + 0.5, float((signal * ys).sum() / total) + 0.5


@pytest.mark.parametrize("preprocess", [
    pytest.param(lambda: images_lib.Preprocess.for_model(_meta_model(MODELS[0])), id="deit-timm"),
    pytest.param(lambda: images_lib.Preprocess.for_model(_meta_model(MODELS[1])), id="clip-timm"),
    pytest.param(lambda: images_lib.Preprocess((224, 224), 200, "bilinear", (0.5,) * 3, (0.5,) * 3), id="padded"),
    pytest.param(lambda: images_lib.Preprocess((224, 224), (240, 260), "bicubic", (0.5,) * 3, (0.5,) * 3),
                 id="squash"),
    pytest.param(lambda: images_lib.Preprocess((224, 224), (221, 259), "bicubic", (0.5,) * 3, (0.5,) * 3),
                 id="squash-odd-padding"),
])
def test_a_marker_lands_where_box_in_crop_says(preprocess):
    """The window timm's resize and crop take is the geometry boxes are mapped with (off by one would show)."""
    preprocess = preprocess()
    background = 0.5
    for height, width, (mx, my) in ((300, 400, (210, 151)), (301, 257, (100, 170)), (120, 100, (47, 60)),
                                    (500, 333, (170, 249)), (224, 224, (25, 199)), (255, 255, (128, 127))):
        pixels = torch.full((3, height, width), background)
        pixels[:, my, mx] = 1.0
        crop = preprocess.crop(pixels)
        x0, y0, x1, y1 = preprocess.box_in_crop(images_lib.Box(mx, my, mx, my), height, width)
        assert 0 < x0 < x1 < preprocess.size[1] and 0 < y0 < y1 < preprocess.size[0]
        x, y = _marker_position(crop, background)
        assert abs(x - (x0 + x1) / 2) < 0.25 and abs(y - (y0 + y1) / 2) < 0.25, (height, width, x, y, x0, y0)


def test_an_unsupported_timm_pipeline_is_refused_with_a_reason():
    with pytest.raises(PipelineError, match="not a resize followed by a centre crop"):
        images_lib.Preprocess.from_data_config({"input_size": (3, 224, 224), "interpolation": "bicubic",
                                                "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9,
                                                "crop_mode": "border"})


# ------------------------------------------------------------------ WebDataset tars


def _write_tar(path, count: int) -> list[np.ndarray]:
    """A WebDataset tar of ``count`` noise images (PNG) with .cls labels; returns the pixels."""
    rng = np.random.default_rng(0)
    pixels = []
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            array = rng.integers(0, 256, (9 + i, 14, 3), dtype=np.uint8)
            pixels.append(array)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            for name, data in ((f"s{i:03d}.png", buffer.getvalue()), (f"s{i:03d}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return pixels


@pytest.fixture
def count_opens(monkeypatch):
    """Counts every open of a path (plain open and tarfile's), by path."""
    counts: dict[str, int] = {}
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__"):
            counts[str(file)] = counts.get(str(file), 0) + 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(tarfile, "bltn_open", counting_open)
    return counts


def test_a_pass_over_a_tar_opens_it_once_and_reads_the_same_pixels(tmp_path, count_opens):
    tar_path = tmp_path / "shard-000.tar"
    expected = _write_tar(tar_path, 40)
    count_opens.clear()
    image_set = images_lib.open_images(str(tar_path))
    assert count_opens == {str(tar_path): 1}  # indexing: one pass over the headers
    assert [r.image_id for r in image_set.refs] == [f"shard-000/s{i:03d}" for i in range(40)]

    count_opens.clear()
    loaded = list(image_set.images())
    assert count_opens == {str(tar_path): 1}
    for image, array in zip(loaded, expected, strict=True):
        assert torch.equal(image.pixels, torch.from_numpy(array).permute(2, 0, 1).float() / 255.0)
        assert image.ref.label == int(image.ref.member[1:4]) % 3

    count_opens.clear()
    part = image_set.slice(10, 25)
    batches = list(part.batches(4))
    assert [len(b) for b in batches] == [4, 4, 4, 3] and count_opens == {str(tar_path): 1}
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip([i for b in batches for i in b], loaded[10:25]))
    # one image on its own reads the same pixels as the pass, and as a reference without the index's offsets
    bare = images_lib.ImageRef(part.refs[3].image_id, 0, None, str(tar_path), part.refs[3].member)
    assert torch.equal(part.load(3).pixels, loaded[13].pixels)
    assert torch.equal(images_lib.read_pixels(bare), loaded[13].pixels)
    # a slice stays small to ship to a Ray worker
    assert len(pickle.dumps(part)) < 200 * len(part)


def test_a_tar_changed_after_indexing_is_a_clear_error(tmp_path):
    tar_path = tmp_path / "shard-000.tar"
    _write_tar(tar_path, 3)
    image_set = images_lib.open_images(str(tar_path))
    with open(tar_path, "r+b") as handle:
        handle.truncate(image_set.refs[2].offset + 10)
    with pytest.raises(PipelineError, match="ends inside sample"):
        list(image_set.images())
