"""Labelled natural images: where they are, what class and boxes they have, how a model sees them.

Two layouts are read, chosen by what the path is:

* an ImageFolder directory (``root/<class>/<image>.jpg``): classes are the sorted
  sub-folder names, so ImageNet's synset folders give timm's 1k class indices;
* WebDataset tars (a ``.tar`` file, a directory of them, or a glob / brace pattern
  such as ``imagenet-{000000..000146}.tar``): one sample is the members sharing a
  key, with an image (jpg/jpeg/png/webp) and an integer ``cls``.

Every image has a deterministic id: its path relative to the ImageFolder root,
or ``<tar stem>/<sample key>``. A tar's samples come in the tar's own order (as
WebDataset reads them), and a pass over a set or a slice of it
(:meth:`ImageSet.images`, :meth:`ImageSet.batches`) opens each tar once and reads
it front to back: the index records where each image's bytes lie. Boxes come
from ImageNet's XML annotations
(PASCAL VOC: a directory of ``<image stem>.xml``, searched recursively) or from
a CSV ``image_id,xmin,ymin,xmax,ymax[,label]`` whose ``image_id`` is the image id
or its file stem; both are in the original image's pixel coordinates.

:class:`Preprocess` is the model's own evaluation transform, as timm builds it
(``timm.data.resolve_model_data_config`` + ``create_transform``: resize the
shorter side to ``size / crop_pct``, centre crop to the native size, normalize);
its pixels are timm's. It adds what timm does not give: it takes full-resolution
pixels, so a probe masks boxes *before* the resize and crop, as the paper did,
and it maps a box from the original image into crop coordinates, with the
geometry of the same resize and crop.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import math
import os
import tarfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import PipelineError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Box:
    """An object box in original-image pixels (x to the right, y down), with its class if annotated."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    label: str | None = None


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    label: int
    class_name: str | None  # the folder (synset) name, when the layout names classes
    source: str  # the image file, or the tar holding it
    member: str | None = None  # the tar member, for WebDataset samples
    offset: int | None = None  # where the member's bytes start in the (uncompressed) tar, and how many
    length: int | None = None

    @property
    def stem(self) -> str:
        return Path(self.image_id).name.split(".")[0]


@dataclass(frozen=True)
class LabelledImage:
    ref: ImageRef
    pixels: torch.Tensor  # (3, H, W) float in [0, 1], full resolution
    boxes: tuple[Box, ...]

    def true_class_boxes(self) -> tuple[Box, ...]:
        """Boxes of the image's own class (all boxes when they carry no class name)."""
        return tuple(b for b in self.boxes if b.label is None or self.ref.class_name is None
                     or b.label == self.ref.class_name)


@dataclass(frozen=True)
class ImageSet:
    """An ordered list of labelled images (a slice of one travels to a worker)."""

    refs: tuple[ImageRef, ...]
    boxes: dict[str, tuple[Box, ...]] = field(default_factory=dict)  # by image stem

    def __len__(self) -> int:
        return len(self.refs)

    def fingerprint(self) -> str:
        """Changes when the images, their order, labels or boxes change."""
        digest = hashlib.sha256()
        for ref in self.refs:
            digest.update(f"{ref.image_id}\t{ref.label}\n".encode())
        for stem in sorted(self.boxes):
            digest.update(f"{stem}:{self.boxes[stem]}\n".encode())
        return digest.hexdigest()[:16]

    def slice(self, start: int, stop: int) -> "ImageSet":
        refs = self.refs[start:stop]
        return ImageSet(refs, {r.stem: self.boxes[r.stem] for r in refs if r.stem in self.boxes})

    def boxes_of(self, ref: ImageRef) -> tuple[Box, ...]:
        return self.boxes.get(ref.stem, ())

    def load(self, index: int) -> LabelledImage:
        """One image, read on its own (a pass over many should use :meth:`images`)."""
        ref = self.refs[index]
        return LabelledImage(ref, read_pixels(ref), self.boxes_of(ref))

    def images(self) -> Iterator[LabelledImage]:
        """Every image in order; each tar is opened once for the whole pass and read front to back."""
        with _Sources() as sources:
            for ref in self.refs:
                yield LabelledImage(ref, _decode(sources.read(ref), ref), self.boxes_of(ref))

    def batches(self, batch_size: int) -> Iterator[list[LabelledImage]]:
        """:meth:`images` in lists of ``batch_size`` (the last may be shorter)."""
        batch: list[LabelledImage] = []
        for image in self.images():
            batch.append(image)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def open_images(path: str, boxes: str | None = None, limit: int | None = None) -> ImageSet:
    """The labelled images at ``path`` (ImageFolder or WebDataset), validated; raise PipelineError otherwise.

    ``limit`` keeps that many images evenly spaced over the whole set, so a small
    run still covers every class of a class-sorted layout.
    """
    if not path:
        raise PipelineError("No images given: set images.path=PATH to an ImageFolder directory or WebDataset tars.")
    refs = _webdataset_refs(path) if _is_webdataset(path) else _folder_refs(path)
    if limit is not None:
        if limit < 1:
            raise PipelineError(f"The image limit must be at least 1, got {limit}.")
        if limit < len(refs):
            refs = [refs[math.floor(i * len(refs) / limit)] for i in range(limit)]
    box_table = read_boxes(boxes) if boxes else {}
    return ImageSet(tuple(refs), box_table)


def _is_webdataset(path: str) -> bool:
    if any(ch in path for ch in "*?{"):
        return True
    return path.endswith(".tar") or (os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.tar"))))


def _folder_refs(path: str) -> list[ImageRef]:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PipelineError(
            f"Images path '{path}' is not a directory, a .tar file or a tar pattern. Point images.path= at an "
            f"ImageFolder root (one sub-folder per class) or at WebDataset tars."
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    refs = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                refs.append(ImageRef(file.relative_to(root).as_posix(), label, name, str(file)))
    if not refs:
        raise PipelineError(
            f"Images path '{path}' holds no images in class sub-folders (expected {path}/<class>/<image>"
            f"{{{','.join(IMAGE_SUFFIXES)}}}). Check the path, or use WebDataset tars."
        )
    return refs


def _webdataset_refs(path: str) -> list[ImageRef]:
    import braceexpand

    pattern = os.path.join(path, "*.tar") if os.path.isdir(path) else path
    tars = sorted({f for p in braceexpand.braceexpand(pattern) for f in glob.glob(os.path.expanduser(p))})
    if not tars:
        raise PipelineError(f"No WebDataset tars match '{path}'. Check the path or pattern.")
    refs = []
    for tar_path in tars:
        samples: dict[str, tarfile.TarInfo] = {}  # key -> image member, in the tar's order
        labels: dict[str, int] = {}
        try:
            # "r:" reads uncompressed tars only: the index keeps byte offsets into the file.
            with tarfile.open(tar_path, "r:") as tar:
                for member in tar:  # one pass over the headers, seeking past the data
                    if not member.isfile():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    key = f"{directory}/{stem}" if directory else stem
                    if ext.lower() in _WDS_IMAGE_EXTS:
                        samples.setdefault(key, member)
                    elif ext.lower() == "cls":
                        labels[key] = int(tar.extractfile(member).read().decode().strip())
        except (tarfile.TarError, OSError, ValueError) as error:
            raise PipelineError(
                f"WebDataset tar '{tar_path}' could not be indexed ({type(error).__name__}: {error}); it must be an "
                f"uncompressed tar in which every sample has an image member and an integer .cls member."
            ) from None
        for key, member in samples.items():
            if key not in labels:
                raise PipelineError(f"WebDataset sample '{key}' in '{tar_path}' has no .cls label member.")
            refs.append(ImageRef(f"{Path(tar_path).stem}/{key}", labels[key], None, tar_path, member.name,
                                 member.offset_data, member.size))
    if not refs:
        raise PipelineError(f"The WebDataset tars at '{path}' hold no image samples.")
    return refs


def read_pixels(ref: ImageRef) -> torch.Tensor:
    """(3, H, W) float in [0, 1] at the image's own resolution (one image; see ImageSet.images for passes)."""
    with _Sources() as sources:
        return _decode(sources.read(ref), ref)


class _Sources:
    """Open files of one pass: each image file or tar is opened at most once, and closed at the end."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._open: dict[str, BinaryIO] = {}

    def __enter__(self) -> "_Sources":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def read(self, ref: ImageRef) -> bytes:
        if ref.member is None:
            with open(ref.source, "rb") as handle:
                return handle.read()
        if ref.offset is None or ref.length is None:  # a ref made elsewhere, without the index's offsets
            with tarfile.open(ref.source) as tar:
                return tar.extractfile(ref.member).read()
        handle = self._open.get(ref.source)
        if handle is None:
            handle = self._open[ref.source] = self._stack.enter_context(open(ref.source, "rb"))
        if handle.tell() != ref.offset:  # in tar order this is the current position: no seek at all
            handle.seek(ref.offset)
        data = handle.read(ref.length)
        if len(data) != ref.length:
            raise PipelineError(f"WebDataset tar '{ref.source}' ends inside sample '{ref.member}' (expected "
                                f"{ref.length} bytes at offset {ref.offset}); the tar changed since it was indexed.")
        return data


def _decode(data: bytes, ref: ImageRef) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as error:
        where = ref.source if ref.member is None else f"{ref.source}:{ref.member}"
        raise PipelineError(f"Image '{ref.image_id}' ({where}) cannot be decoded ({type(error).__name__}: "
                            f"{error}); replace or remove the file.") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_boxes(path: str) -> dict[str, tuple[Box, ...]]:
    """Boxes by image stem, from a directory of ImageNet/PASCAL VOC XML files or a CSV."""
    source = Path(path).expanduser()
    if source.is_dir():
        table: dict[str, list[Box]] = {}
        for xml in sorted(source.rglob("*.xml")):
            table.setdefault(xml.stem, []).extend(_voc_boxes(xml))
        if not table:
            raise PipelineError(f"Box directory '{path}' holds no .xml annotation files (ImageNet/PASCAL VOC).")
        return {stem: tuple(boxes) for stem, boxes in table.items()}
    if source.is_file() and source.suffix.lower() == ".csv":
        return _csv_boxes(source)
    raise PipelineError(
        f"Boxes '{path}' are neither a directory of ImageNet XML annotations nor a .csv file with columns "
        f"image_id,xmin,ymin,xmax,ymax[,label]."
    )


def _voc_boxes(xml: Path) -> list[Box]:
    try:
        root = ElementTree.parse(xml).getroot()
        boxes = []
        for obj in root.iter("object"):
            bndbox = obj.find("bndbox")
            values = [float(bndbox.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax")]
            name = obj.find("name")
            boxes.append(Box(*values, label=name.text.strip() if name is not None and name.text else None))
        return boxes
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
        raise PipelineError(
            f"Annotation '{xml}' is not a readable PASCAL VOC file ({type(error).__name__}: {error}): every "
            f"<object> needs a <bndbox> with numeric xmin, ymin, xmax, ymax."
        ) from None


def _csv_boxes(path: Path) -> dict[str, tuple[Box, ...]]:
    table: dict[str, list[Box]] = {}
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        for number, row in enumerate(rows, start=1):
            if not row or (number == 1 and row[0].strip().lower() == "image_id"):
                continue
            try:
                values = [float(v) for v in row[1:5]]
                if len(values) != 4 or len(row) > 6:
                    raise ValueError("expected 5 or 6 columns")
            except ValueError as error:
                raise PipelineError(
                    f"Box CSV '{path}' line {number} is not image_id,xmin,ymin,xmax,ymax[,label] ({error})."
                ) from None
            label = row[5].strip() if len(row) == 6 and row[5].strip() else None
            stem = Path(row[0].strip()).name.split(".")[0]
            table.setdefault(stem, []).append(Box(*values, label=label))
    return {stem: tuple(boxes) for stem, boxes in table.items()}


def box_mask(height: int, width: int, boxes: tuple[Box, ...]) -> torch.Tensor:
    """(H, W) bool, True on pixels whose centre lies inside any box (VOC corners are inclusive pixels)."""
    ys = torch.arange(height).view(-1, 1) + 0.5
    xs = torch.arange(width).view(1, -1) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        mask |= (xs >= box.xmin) & (xs <= box.xmax + 1) & (ys >= box.ymin) & (ys <= box.ymax + 1)
    return mask


@dataclass(frozen=True)
class Geometry:
    """Where a full-resolution image lands: resized to (height, width), then cropped at (top, left).

    A negative top or left is the padding a centre crop larger than the resized image adds before it.
    """

    height: int
    width: int
    top: int
    left: int
    scale_y: float  # resized / original
    scale_x: float


# The eval pipelines whose geometry Preprocess knows: timm's "center" (shorter side) and "squash" crops.
_PIPELINE = ("Resize", "CenterCrop", "MaybeToTensor", "Normalize")


@dataclass(frozen=True)
class Preprocess:
    """A model's evaluation transform (timm's resize, centre crop and normalization) on full-resolution pixels.

    Build it with :meth:`for_model` (or :meth:`from_config`), which take timm's own transform for the
    model; constructing it from the numbers builds the same pipeline from the same pieces.
    """

    size: tuple[int, int]  # crop (height, width): the model's native input
    resize: int | tuple[int, int]  # the shorter side after resizing, or (height, width) for a squash resize
    interpolation: str  # timm's name: bilinear | bicubic | ...
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # The resize, crop and conversion to a [0, 1] tensor (timm's pipeline, without its Normalize).
    pixels_transform: Callable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.pixels_transform is None:
            from timm.data.transforms import MaybeToTensor, str_to_interp_mode
            from torchvision import transforms

            pipeline = transforms.Compose([
                transforms.Resize(self.resize, interpolation=str_to_interp_mode(self.interpolation)),
                transforms.CenterCrop(self.size),
                MaybeToTensor(),
            ])
            object.__setattr__(self, "pixels_transform", pipeline)

    @classmethod
    def for_model(cls, model, input_size: tuple[int, int, int] | None = None) -> "Preprocess":
        """The model's evaluation transform: ``timm.data.resolve_model_data_config(model)``, at
        ``input_size`` for a model built at another size than its pretrained config's (model.img_size)."""
        import timm.data

        config = timm.data.resolve_model_data_config(model)
        return cls.from_data_config({**config, "input_size": tuple(input_size)} if input_size else config)

    @classmethod
    def from_config(cls, pretrained_cfg: dict) -> "Preprocess":
        """The evaluation transform of a timm ``pretrained_cfg``: ``timm.data.resolve_data_config``."""
        import timm.data

        return cls.from_data_config(timm.data.resolve_data_config(pretrained_cfg=dict(pretrained_cfg)))

    @classmethod
    def from_data_config(cls, config: dict) -> "Preprocess":
        """``timm.data.create_transform(**config)`` for evaluation, with its numbers read back for the geometry."""
        import timm.data
        from timm.data.transforms import interp_mode_to_str
        from torchvision import transforms

        transform = timm.data.create_transform(**config, is_training=False)
        steps = list(getattr(transform, "transforms", [transform]))
        kinds = tuple(type(step).__name__ for step in steps)
        if kinds != _PIPELINE:
            raise PipelineError(
                f"timm's evaluation transform for this model ({' -> '.join(kinds)}, from crop_mode="
                f"{config.get('crop_mode')!r}, input_size={config.get('input_size')}) is not a resize followed by "
                "a centre crop, whose geometry the probes and dataset examples map boxes and patches through. Use "
                "a model whose data config has crop_mode 'center' (square input) or 'squash'."
            )
        resize, crop, _, normalize = steps
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        return cls(tuple(crop.size), size, interp_mode_to_str(resize.interpolation),
                   tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std),
                   transforms.Compose(steps[:-1]))

    def geometry(self, height: int, width: int) -> Geometry:
        """The resize and crop as torchvision's Resize and CenterCrop compute them."""
        if isinstance(self.resize, tuple):
            new_h, new_w = self.resize
        elif height <= width:
            new_h, new_w = self.resize, int(self.resize * width / height)
        else:
            new_h, new_w = int(self.resize * height / width), self.resize
        return Geometry(new_h, new_w, _crop_start(new_h, self.size[0]), _crop_start(new_w, self.size[1]),
                        new_h / height, new_w / width)

    def crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """Full-resolution (3, H, W) in [0, 1] -> the model's crop (3, h, w) in [0, 1], not normalized.

        The pixels go through timm's pipeline as the 8-bit image they were decoded from (masking
        multiplies by 0 or 1, which keeps them 8-bit values).
        """
        array = (pixels.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return self.pixels_transform(Image.fromarray(np.ascontiguousarray(array)))

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) crops in [0, 1] -> model input, with timm's mean and std."""
        mean = torch.tensor(self.mean, device=crops.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=crops.device).view(1, 3, 1, 1)
        return (crops - mean) / std

    def box_in_crop(self, box: Box, height: int, width: int) -> tuple[float, float, float, float]:
        """The box's (x0, y0, x1, y1) edges in crop pixels, clipped to the crop (may be empty)."""
        g = self.geometry(height, width)
        x0 = box.xmin * g.scale_x - g.left
        x1 = (box.xmax + 1) * g.scale_x - g.left
        y0 = box.ymin * g.scale_y - g.top
        y1 = (box.ymax + 1) * g.scale_y - g.top
        h, w = self.size
        return (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))

    def box_cover(self, boxes: tuple[Box, ...], height: int, width: int, grid: tuple[int, int]) -> torch.Tensor:
        """(rows * cols,) share of each patch cell of the crop covered by any box (overlaps counted once)."""
        h, w = self.size
        fine = torch.zeros(h, w, dtype=torch.bool)
        ys = torch.arange(h).view(-1, 1) + 0.5
        xs = torch.arange(w).view(1, -1) + 0.5
        for box in boxes:
            x0, y0, x1, y1 = self.box_in_crop(box, height, width)
            fine |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        cells = F.adaptive_avg_pool2d(fine.float()[None, None], grid)[0, 0]
        return cells.flatten()


def _crop_start(length: int, crop: int) -> int:
    """torchvision's CenterCrop: a side shorter than the crop is padded (the odd pixel at the end), else centred."""
    if crop > length:
        return -((crop - length) // 2)
    return int(round((length - crop) / 2.0))


def thumbnail(crop: torch.Tensor, size: int) -> torch.Tensor:
    """(3, size, size) uint8 thumbnail of a crop, for ``pipeline.store.png.encode_png``."""
    small = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (small.clamp(0, 1) * 255).round().to(torch.uint8)
