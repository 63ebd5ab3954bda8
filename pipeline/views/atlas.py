"""The atlas: a static website of a store's visualizations, browsable from file:// or any static server.

    python -m pipeline.atlas store.root=/data/atlas out=/data/atlas-site

Layout of the site::

    index.html              models by family; per weights a strip of each layer's strongest feature; search
    models/<model>.html      per model (and weights/target/objective/config): layers x features, early -> late;
                             each layer's features sortable and filterable by any measurement (atlas.js)
    features/<key>.html      one visualization: image, activation, label, measurements (descriptors,
                             baselines, superstimulus ratio, reliability), the same unit under the store's
                             other configs side by side, provenance, dataset examples
    images/<key>.png         the record's image as stored
    thumbs/<key>.png         thumbnails the grids and search show (lazy-loaded), subsampled, never averaged
    examples/<key>-r<rank>.jpg   dataset examples with their activation map overlaid, if the store has them
    atlas-index.js           the search index as a script that sets a global, since fetch() of a
                             local JSON file is refused under file://
    manifest.json            which keys have their pages, so a re-run writes only new ones

``<key>`` and ``<model>`` are safe slugs (:func:`key_slug`, :func:`model_slug`): the key or name
itself when it holds only ``A-Za-z0-9_-``, else those characters plus a hash, so no record can
name a file outside the site or break out of an attribute. Pages are Jinja2 templates
(``templates/``, one base layout) rendered with autoescaping, so every text from the store is
escaped where it lands.

Pages, images and thumbnails of a key are written once; a re-run writes those
of new keys (and of keys whose dataset examples or other configs changed), then rewrites the
index, model pages and search index, which summarise every key. The manifest is
written last, so an interrupted run is completed by the next. A record whose PNG
does not decode gets a placeholder and a warning, is counted in the build report,
and is tried again by the next run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import html
import json
import logging
import math
import multiprocessing
import os
import re
import signal
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jinja2
import markupsafe
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from PIL import Image, ImageDraw

from pipeline.errors import PipelineError
from pipeline.store.png import PngDecodeError, decode_png, encode_png, encode_texture_png
from pipeline.store.schemas import BASELINE_COLUMNS, DESCRIPTOR_COLUMNS, EMBEDDING_COLUMN, EXAMPLES
from pipeline.views.readers import METADATA_COLUMNS, AtlasStore, open_store

log = logging.getLogger(__name__)

# Part of the manifest: a site written by other page templates is rebuilt whole.
SITE_VERSION = 3
# What makes two records the same unit under different configs (config_hash aside): a feature page shows them together.
UNIT_FIELDS = ("model", "weights", "target", "objective", "layer", "feature", "seed")
# A variant of a model with more images than this gets its grid on pages of one layer and at most
# PAGE_FEATURES features each, linked from the model's page: one grid of a wide model (37,000 MLP features
# of deit_base) is megabytes of HTML, a DOM no browser keeps responsive.
MODEL_PAGE_IMAGES = 1024
PAGE_FEATURES = 256
# Features of a layer per file of the search index (search/), so a search loads only the files that can match.
SEARCH_PART_FEATURES = 256
THUMB_SIZE = 128  # thumbnail side, and the size grids show them at (1:1, so browsers do not average either)
EXAMPLE_SIZE = 128
# What to do about a record whose image does not decode ({root}: the store root).
REPAIR_COMMAND = "vit-atlas status store.root={root} verify=true repair=true"
REPAIR_HINT = (f"Verify and repair the store (`{REPAIR_COMMAND}`), or re-run the sweep that made the record to "
               "recompute it.")
# A manifest entry that makes the next run try a key again.
_UNREADABLE = "unreadable"

_MAX_NAME = 100
_SAFE_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{_MAX_NAME}}}")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_ASSETS = Path(__file__).with_name("atlas_assets")
# The atlas leaves the embedding to the readers (reliability): hundreds of floats per record, nothing to show.
_PAGE_COLUMNS = [name for name in METADATA_COLUMNS if name != EMBEDDING_COLUMN]
# What a layer's features can be sorted and filtered by on the model page, and what the feature page shows.
SORTABLE = ("activation", "superstimulus_ratio", "reliability", *DESCRIPTOR_COLUMNS, *BASELINE_COLUMNS)
_JOINED = ("top_natural", "superstimulus_ratio", "reliability")  # per record, from AtlasStore.measurements()


@dataclasses.dataclass(frozen=True)
class BuildReport:
    records: int
    models: int
    pages_written: int
    pages_kept: int
    index: Path
    unreadable: tuple[str, ...] = ()  # keys whose image does not decode: shown as placeholders


def build_site(store_root: str, out: str | Path, workers: int | None = None) -> BuildReport:
    """Write (or bring up to date) the atlas site of a store; feature pages, images and thumbnails by
    ``workers`` processes (default: one per core; 1: in this process)."""
    workers = workers or os.cpu_count() or 1
    with _page_writers(workers) as pool:
        return _build_site(store_root, Path(out), pool, workers)


def _build_site(store_root: str, out: Path, pool: multiprocessing.pool.Pool | None, workers: int) -> BuildReport:
    atlas = open_store(store_root)
    _check_out(out)
    records = atlas.table(columns=_PAGE_COLUMNS)
    examples = _Examples.open(atlas)

    manifest_path = out / "manifest.json"
    manifest = _read_manifest(manifest_path)
    rows = {row["key"]: row for row in records.to_pylist()}
    for joined in atlas.measurements().select(["key", *_JOINED]).to_pylist():
        rows[joined["key"]].update(joined)
    _check_names(rows)
    configs = _unit_configs(rows.values())
    example_digests = examples.fingerprints()
    fingerprints = _fingerprints(rows, example_digests, configs)
    pending = [key for key in rows if manifest.get(key) != fingerprints.get(key, "")
               or not (out / "features" / f"{key_slug(key)}.html").exists()]

    for folder in ("features", "images", "thumbs", "examples", "models", "search"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    if not manifest_path.exists():  # marks the directory as an atlas, so an interrupted first run can resume
        _write_manifest(manifest_path, {})
    unreadable = _write_pages(atlas, out, rows, pending, examples, set(example_digests), configs, pool, workers)
    broken = frozenset(unreadable)

    models = _group_models(rows.values())
    pages = ((out, "models", name, "model.html", context)
             for model, variants in models.items() for name, context in _model_pages(model, variants, broken))
    for _ in _in_order(pool, _write_page, pages, in_flight=2 * workers):
        pass
    _write_text(out / "index.html", _index_page(models, len(rows), broken))
    index, parts = _search_index(models)
    for name, text in parts.items():
        _write_text(_site_file(out, "search", f"{name}.js"), text)
    _write_text(out / "atlas-index.js", index)
    for asset in ("atlas.css", "atlas.js"):
        _write_text(out / asset, (_ASSETS / asset).read_text())
    _write_manifest(manifest_path, {key: _UNREADABLE if key in broken else fingerprints.get(key, "") for key in rows})
    return BuildReport(len(rows), len(models), len(pending), len(rows) - len(pending), out / "index.html",
                       tuple(sorted(unreadable)))


# ------------------------------------------------------------------ inputs


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"The atlas output {str(out)!r} is a file, not a directory. Choose a directory for out=.")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise PipelineError(
            f"The atlas output {str(out)!r} is a non-empty directory that holds no atlas (no manifest.json). "
            "Choose an empty or new directory for out=, or the directory of an earlier atlas to update it."
        )


def _read_manifest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # an unreadable manifest only costs a full rebuild
    return manifest.get("pages", {}) if manifest.get("site_version") == SITE_VERSION else {}


def _write_manifest(path: Path, pages: dict[str, str]) -> None:
    _write_text(path, json.dumps({"site_version": SITE_VERSION, "pages": pages}, indent=0))


class _Examples:
    """The store's optional table of dataset examples: top natural images per key."""

    def __init__(self, dataset: ds.Dataset | None):
        self.dataset = dataset

    @classmethod
    def open(cls, atlas: AtlasStore) -> "_Examples":
        table = atlas.store.table(EXAMPLES)
        return cls(table.dataset() if table.done() else None)

    def fingerprints(self) -> dict[str, str]:
        """Per key, a digest of its examples (without image bytes): a change rewrites the key's page."""
        if self.dataset is None:
            return {}
        table = self.dataset.to_table(columns=["key", "rank", "image_id", "activation"])
        rows: dict[str, list] = defaultdict(list)
        for row in table.to_pylist():
            rows[row["key"]].append((row["rank"], row["image_id"], row["activation"]))
        return {key: hashlib.sha256(repr(sorted(v)).encode()).hexdigest()[:16] for key, v in rows.items()}

    def for_keys(self, keys: list[str]) -> dict[str, list[dict]]:
        if self.dataset is None or not keys:
            return {}
        table = self.dataset.to_table(filter=ds.field("key").isin(pa.array(keys, type=pa.string())),
                                      columns=EXAMPLES.schema.names)
        found: dict[str, list[dict]] = defaultdict(list)
        for row in table.to_pylist():
            found[row["key"]].append(row)
        return {key: sorted(rows, key=lambda r: r["rank"]) for key, rows in found.items()}


def _unit_configs(rows) -> dict[str, list[dict]]:
    """key -> the same unit under each config of the store, itself included, captioned with what differs;
    only for units the store holds under more than one config."""
    units: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        units[tuple(row[name] for name in UNIT_FIELDS)].append(row)
    configs = {}
    for same in units.values():
        if len(same) < 2:
            continue
        captions = _config_differences([row["config"] for row in same])
        shown = sorted(({"key": row["key"], "slug": key_slug(row["key"]), "config_hash": row["config_hash"],
                         "activation": row["activation"], "differs": caption}
                        for row, caption in zip(same, captions)), key=lambda c: (c["differs"], c["config_hash"]))
        configs.update((row["key"], shown) for row in same)
    return configs


def _config_differences(texts: list[str]) -> list[list[str]]:
    """Per config JSON, the ``name=value`` settings in which it differs from the others (optim's without the
    ``optim.`` prefix, the parameterization first); empty where the JSON does not tell them apart."""
    flat = [_flat_config(text) for text in texts]
    names = sorted({name for config in flat for name in config},
                   key=lambda name: (name != "optim.param", name))
    missing = object()
    differing = [name for name in names if len({config.get(name, missing) for config in flat}) > 1]
    return [[f"{name.removeprefix('optim.')}={config[name]}" for name in differing if name in config]
            for config in flat]


def _flat_config(text: str) -> dict[str, str]:
    """A record's config JSON as {"optim.lr": "0.05", ...}, values as JSON text; {} if it is not a JSON object."""
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return {}
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{prefix}.{name}" if prefix else str(name))
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk(config, "")
    return flat if isinstance(config, dict) else {}


def _fingerprints(rows: dict[str, dict], examples: dict[str, str], configs: dict[str, list[dict]]) -> dict[str, str]:
    """Per key, a digest of what its page shows that can change: its examples, its measurements, and which
    configs stand beside it. A change rewrites the page. Measurements change when ``vit-atlas describe``
    measures an old record, when examples arrive (the superstimulus ratio) or another seed of the unit does
    (its reliability); siblings change when the store gains the unit under another config.

    Measurements count as the page shows them (``_as_shown``): reliability is centred on the model's other
    units, so each new record moves every unit's value in its third decimal, and finer digits made a re-run
    after 1% new records rewrite every page of the model."""
    def shown(row: dict) -> list:
        return [_as_shown(name, row.get(name)) for name in _MEASURED_SHOWN]

    return {key: hashlib.sha256(repr((examples.get(key, ""), shown(row),
                                      [c["key"] for c in configs.get(key, [])])).encode()).hexdigest()[:16]
            for key, row in rows.items()}


# How the feature page shows a measurement (measurements.html takes reliability's from here); the others
# to at most 4 significant digits.
_SHOWN_AS = {"reliability": ".2f"}


def _as_shown(name: str, value):
    return format(value, _SHOWN_AS.get(name, ".4g")) if isinstance(value, float) else value


def _group_models(rows) -> dict[str, dict[tuple, list[dict]]]:
    """model -> variant (weights, target, objective, config_hash) -> records, models and variants sorted."""
    models: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        models[row["model"]][(row["weights"], row["target"], row["objective"], row["config_hash"])].append(row)
    return {model: {variant: models[model][variant] for variant in sorted(models[model], key=_variant_order)}
            for model in sorted(models)}


def _variant_order(variant: tuple) -> tuple:
    weights, target, objective, config_hash = variant
    # MLP features, the interpretable ones, first; then real weights, planted, random
    return (target != "mlp", target, weights_order(weights), objective, config_hash)


# ------------------------------------------------------------------ per-key files


# Records per task of a page-writing process: few enough that a task's image bytes (about 8 MB at
# 224 px) stay small and the processes' share of the work stays even.
_TASK_RECORDS = 64


@contextlib.contextmanager
def _page_writers(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """The processes that write feature pages, images and thumbnails (None: this process does).

    Forked at once, before the build reads the store: a fork copies only the calling thread, so
    pyarrow's reading threads (and any lock they hold) must not exist yet. Forked, not spawned: a
    spawned process would import torch with the pipeline package, seconds per process. Leaving the
    block (an error, Ctrl-C) terminates them.
    """
    if workers <= 1:
        yield None
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_leave_interrupts_to_the_parent) as pool:
        yield pool


def _leave_interrupts_to_the_parent() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the build, which ends the pool


def _write_pages(atlas: AtlasStore, out: Path, rows: dict[str, dict], pending: list[str], examples: _Examples,
                 with_examples: set[str], configs: dict[str, list[dict]], pool: multiprocessing.pool.Pool | None,
                 workers: int) -> list[str]:
    """Images, thumbnails, example overlays and the feature page of each pending key.

    The store is read here, in bounded batches, and each batch goes to a page-writing process; at most
    two batches per process are in flight, so memory holds a few batches' image bytes, however large the
    store. ``with_examples``: the keys that have dataset examples, whose examples are read with their
    batch. Returns the keys whose image does not decode: each is warned about, and gets a placeholder.
    """

    def tasks() -> Iterator[tuple[Path, list[tuple]]]:
        for batch in atlas.keyed_batches(pending, columns=["key", "png"], batch_size=_TASK_RECORDS):
            keys = batch.column("key").to_pylist()
            found = examples.for_keys([key for key in keys if key in with_examples])
            yield out, [(rows[key], png, found.get(key, []), configs.get(key, []))
                        for key, png in zip(keys, batch.column("png").to_pylist())]

    unreadable = []
    for problems in _in_order(pool, _write_keys, tasks(), in_flight=2 * workers):
        for key, problem in problems:
            unreadable.append(key)
            log.warning("%s", _unreadable_warning(rows[key], problem, atlas.root))
    return unreadable


def _in_order(pool: multiprocessing.pool.Pool | None, function: Callable, tasks: Iterable[tuple],
              in_flight: int) -> Iterator:
    """``function(*task)`` of each task, in order: in the pool, at most ``in_flight`` tasks at a time (a
    pool's own map would read every task, and so every image, ahead), or here without one."""
    if pool is None:
        yield from (function(*task) for task in tasks)
        return
    running: collections.deque = collections.deque()
    for task in tasks:
        running.append(pool.apply_async(function, task))
        if len(running) >= in_flight:
            yield running.popleft().get()
    while running:
        yield running.popleft().get()


def _write_keys(out: Path, items: list[tuple]) -> list[tuple[str, str]]:
    """Each (row, png, examples, configs)'s files; (key, why) of those whose image does not decode."""
    problems = ((row["key"], _write_key(out, row, png, examples, configs)) for row, png, examples, configs in items)
    return [(key, problem) for key, problem in problems if problem is not None]


def _write_key(out: Path, row: dict, png: bytes, examples: list[dict], configs: list[dict]) -> str | None:
    """Write one key's files; returns why its image does not decode (then a placeholder stands in), else None."""
    slug = key_slug(row["key"])
    try:
        pixels = decode_png(png)
    except PngDecodeError as error:
        problem = str(error)
        _site_file(out, "thumbs", f"{slug}.png").write_bytes(_placeholder_thumbnail())
        _site_file(out, "images", f"{slug}.png").unlink(missing_ok=True)  # an image from before it broke
    else:
        problem = None
        _site_file(out, "images", f"{slug}.png").write_bytes(png)
        _site_file(out, "thumbs", f"{slug}.png").write_bytes(encode_texture_png(thumbnail_pixels(pixels)))
    shown = []
    for example in examples:
        try:
            overlay = _example_overlay(example)
        except PngDecodeError as error:
            log.warning("The dataset example %r (rank %s) of record %r has a thumbnail that does not decode: %s; "
                        "it is left out of the feature page. Re-run pipeline.examples to recompute it.",
                        example["image_id"], example["rank"], row["key"], error)
            continue
        overlay.save(_site_file(out, "examples", f"{slug}-r{int(example['rank'])}.jpg"), format="JPEG", quality=85)
        shown.append(example)
    _write_text(_site_file(out, "features", f"{slug}.html"), _feature_page(row, shown, problem, configs))
    return problem


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
def _placeholder_thumbnail() -> bytes:
    """A grey tile with a dark border and a cross: plainly not a visualization."""
    tile = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (205, 205, 205))
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, THUMB_SIZE - 1, THUMB_SIZE - 1), outline=(90, 90, 90), width=3)
    draw.line((0, 0, THUMB_SIZE - 1, THUMB_SIZE - 1), fill=(170, 40, 40), width=3)
    draw.line((0, THUMB_SIZE - 1, THUMB_SIZE - 1, 0), fill=(170, 40, 40), width=3)
    return encode_png(np.asarray(tile))


def _unreadable_warning(row: dict, problem: str, store_root: str) -> str:
    return (f"Record {row['key']!r} ({row['model']}, weights {row['weights']}, layer {row['layer']}, feature "
            f"{row['feature']}) has an image that does not decode: {problem}. The atlas shows a placeholder for it. "
            + REPAIR_HINT.format(root=store_root))


def _example_overlay(example: dict) -> Image.Image:
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


# ------------------------------------------------------------------ safe names


def key_slug(key: str) -> str:
    """The file name stem of a record's pages and images: the key itself when it is a safe name.

    A safe name is 1 to 100 of ``A-Z a-z 0-9 _ -`` (what the sweep's keys are). Anything else (markup,
    quotes, slashes, dots, ``..``, an absolute path, a very long key) keeps its safe characters and
    gets a hash of the whole key, so it can neither leave the site's folders nor break an attribute.
    """
    return _safe_name(key)


def model_slug(model: str) -> str:
    """A file name for a model page; names with '/', ':' or '.' get a hash so two never collide."""
    return _safe_name(model)


def _safe_name(text: str) -> str:
    if _SAFE_NAME.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    slug = _SLUG_UNSAFE.sub("_", text)[:_MAX_NAME].strip("_")
    return f"{slug}-{digest}" if slug else f"x-{digest}"


_MEASURED_SHOWN = (*DESCRIPTOR_COLUMNS, *BASELINE_COLUMNS, *_JOINED)


# Fields the pages group, sort, link or format by: a record without one cannot be placed.
_NEEDED = ("model", "family", "weights", "target", "objective", "config_hash", "layer", "feature", "seed",
           "activation", "activation_trace", "steps", "image_size")


def _check_names(rows: dict[str, dict]) -> None:
    """Refuse a store whose records cannot get distinct, safe file names (before anything is written)."""
    seen: dict[str, str] = {}
    for key, row in rows.items():
        if not isinstance(key, str) or not key:
            raise PipelineError(
                f"The store has a record with an empty key ({row.get('model')!r}, weights {row.get('weights')!r}, "
                f"layer {row.get('layer')}, feature {row.get('feature')}): the atlas names every page after "
                "its record's key. Remove or rewrite that record in the store (keys are made by the sweep)."
            )
        missing = [name for name in _NEEDED if row.get(name) is None]
        if missing:
            raise PipelineError(
                f"The store's record {key!r} has no {', '.join(missing)} (null), which the atlas needs to place "
                "it. Remove or rewrite that record in the store; records made by the sweep always have them."
            )
        name = key_slug(key)
        other = seen.setdefault(name.casefold(), key)  # case-insensitive file systems merge names by case
        if other != key:
            raise PipelineError(
                f"The store's records {other!r} and {key!r} would share the atlas page features/{name}.html "
                "(their keys differ only in characters a file name cannot hold safely, or in case). "
                "Rename or remove one of them in the store; keys made by the sweep never collide."
            )
    models: dict[str, str] = {}
    for model in sorted({row["model"] for row in rows.values()}):
        other = models.setdefault(model_slug(model).casefold(), model)
        if other != model:
            raise PipelineError(
                f"The store's models {other!r} and {model!r} would share the atlas page "
                f"models/{model_slug(model)}.html. Rename one of them in the store."
            )


def _site_file(out: Path, folder: str, name: str) -> Path:
    """out/folder/name, for a name made of slugs: checked to stay inside the site, as a last line of defence."""
    path = out / folder / name
    if path.parent != out / folder or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise PipelineError(f"The atlas refused to write {name!r}: file names in the site are slugs of keys.")
    return path


# ------------------------------------------------------------------ pages


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.views", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["count"] = _count
    environment.filters["fmt"] = format
    environment.filters["text"] = _element_text
    return environment


def _element_text(value: str) -> markupsafe.Markup:
    """Escaped for an element's content only (``<``, ``>``, ``&``), leaving quotes readable, as in a <pre>
    of JSON. Never for an attribute value: autoescaping (which also escapes quotes) is for those."""
    return markupsafe.Markup(html.escape(str(value), quote=False))


def _render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)


def _thumb(row: dict, unreadable: frozenset[str] = frozenset()) -> dict:
    alt = f"{row['model']} layer {row['layer']} feature {row['feature']}" + (f" ({row['label']})" if row["label"] else "")
    return {"slug": key_slug(row["key"]), "alt": alt, "layer": row["layer"], "unreadable": row["key"] in unreadable}


def _variant_title(variant: tuple) -> str:
    weights, target, objective, config_hash = variant
    return f"weights {weights} · target {target} · objective {objective} · config {config_hash}"


def weights_kind(weights: str) -> str:
    """pretrained | file | planted | random | other, from a record's weights id."""
    for prefix, kind in (("pretrained-", "pretrained"), ("sha256-", "file"), ("planted-", "planted"),
                         ("random-", "random")):
        if weights.startswith(prefix):
            return kind
    return "other"


# Real weights first, then planted (a check of the method), then random (a baseline).
_WEIGHTS_RANK = {"pretrained": 0, "file": 0, "other": 0, "planted": 1, "random": 2}
_WEIGHTS_NOTES = {
    "random": "random weights: a baseline, expected to look like noise",
    "planted": "planted weights: units wired to known colours and gratings, a check of the method",
}


def _weights_note(weights: str) -> dict | None:
    kind = weights_kind(weights)
    return {"kind": kind, "text": _WEIGHTS_NOTES[kind]} if kind in _WEIGHTS_NOTES else None


def weights_order(weights: str) -> tuple:
    """Sort key: real weights (pretrained, a file) first, then planted, then random."""
    return (_WEIGHTS_RANK[weights_kind(weights)], weights)


def _model_pages(model: str, variants: dict[tuple, list[dict]],
                 unreadable: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict]]:
    """(file name, model.html context) of the model's page and of its variants' pages, if any.

    The model's page shows each variant's layers x features grid, early -> late; a variant of more than
    MODEL_PAGE_IMAGES images gets links instead, per layer, to pages of PAGE_FEATURES features each.
    """
    slug = model_slug(model)
    family = next(iter(variants.values()))[0]["family"]
    total = sum(len(rows) for rows in variants.values())
    heading = {"up": "../", "scripts": ("atlas.js",), "model": model, "model_slug": slug, "family": family,
               "thumb_size": THUMB_SIZE, "sortable": SORTABLE, "page_features": PAGE_FEATURES}
    sections = []
    for number, (variant, rows) in enumerate(variants.items()):
        cells: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))  # layer -> feature -> rows
        for row in sorted(rows, key=lambda r: (r["seed"], r["key"])):
            cells[row["layer"]][row["feature"]].append(row)
        layers = sorted(cells)
        features = sorted({feature for layer in cells.values() for feature in layer})
        section = {"title": _variant_title(variant), "note": _weights_note(variant[0]), "images": len(rows),
                   "layers": layers, "features": features, "paged": False, "rows": None, "pages": None}
        if len(rows) <= MODEL_PAGE_IMAGES:
            section["rows"] = [_grid_row(layer, features, cells[layer], unreadable) for layer in layers]
        else:
            section["pages"] = []
            for layer in layers:
                shown = sorted(cells[layer])
                chunks = [shown[start:start + PAGE_FEATURES] for start in range(0, len(shown), PAGE_FEATURES)]
                names = [f"{slug}-v{number}-l{layer}-p{page}" for page in range(len(chunks))]
                section["pages"].append({"layer": layer, "links": [
                    {"name": name, "first": chunk[0], "last": chunk[-1]} for name, chunk in zip(names, chunks)]})
                for page, (name, chunk) in enumerate(zip(names, chunks)):
                    images = sum(len(cells[layer][feature]) for feature in chunk)
                    where = f"layer {layer} · features {chunk[0]}–{chunk[-1]}"
                    yield name, {**heading, "title": f"{model} · {where} · vit-atlas", "total": images, "page": {
                        "where": where, "number": page + 1, "of": len(chunks),
                        "previous": names[page - 1] if page else None,
                        "next": names[page + 1] if page + 1 < len(chunks) else None},
                        "variants": [{**section, "images": images, "layers": [layer], "features": chunk,
                                      "paged": True, "pages": None,
                                      "rows": [_grid_row(layer, chunk, cells[layer], unreadable)]}]}
        sections.append(section)
    yield slug, {**heading, "title": f"{model} · vit-atlas", "total": total, "page": None, "variants": sections}


def _grid_row(layer: int, features: list[int], cells: dict[int, list[dict]], unreadable: frozenset[str]) -> dict:
    return {"layer": layer, "cells": [{"feature": feature, "values": _cell_values(cells.get(feature, [])),
                                       "thumbs": [_thumb(row, unreadable) for row in cells.get(feature, [])]}
                                      for feature in features]}


def _write_page(out: Path, folder: str, name: str, template: str, context: dict) -> None:
    _write_text(_site_file(out, folder, f"{name}.html"), _render(template, **context))


def _cell_values(rows: list[dict]) -> dict[str, str]:
    """A grid cell's sort keys: per measurement, the mean over the cell's records (its seeds) where measured."""
    values = {}
    for name in SORTABLE:
        found = [value for row in rows if (value := row.get(name)) is not None and math.isfinite(value)]
        if found:
            values[name] = format(sum(found) / len(found), ".6g")
    return values


def _feature_page(row: dict, examples: list[dict], unreadable: str | None = None,
                  configs: list[dict] = ()) -> str:
    title = f"{row['model']} · layer {row['layer']} · feature {row['feature']}"
    try:
        config = json.dumps(json.loads(row["config"]), indent=2, sort_keys=True)
    except (json.JSONDecodeError, TypeError):
        config = str(row["config"])
    return _render(
        "feature.html", title=f"{title} · vit-atlas", up="../", scripts=(), row=row, heading=title,
        slug=key_slug(row["key"]), model_slug=model_slug(row["model"]), note=_weights_note(row["weights"]),
        unreadable=unreadable, repair_command=REPAIR_COMMAND.format(root="STORE"),
        trace=_sparkline(row["activation_trace"]), config=config,
        configs=[{**c, "current": c["key"] == row["key"]} for c in configs], thumb_size=THUMB_SIZE,
        examples=[{"rank": int(e["rank"]), "image_id": e["image_id"], "activation": e["activation"]} for e in examples],
        provenance=[(name, _format_value(name, row[name])) for name in _PAGE_COLUMNS
                    if name != "config" and name not in _MEASURED_SHOWN],
        measurements=_measurements(row),
    )


def _measurements(row: dict) -> dict | None:
    """The feature page's measurements block: None for a record not measured yet (a v1 part)."""
    from pipeline.engine.descriptors import DESCRIPTORS, baseline_gap

    if row.get(DESCRIPTOR_COLUMNS[0]) is None and row.get("activation_noise") is None:
        return None
    noise, grey = row.get("activation_noise"), row.get("activation_grey")
    return {
        "descriptors": [{"name": name, "value": row.get(name), "unit": DESCRIPTORS[name].unit,
                         "definition": DESCRIPTORS[name].definition} for name in DESCRIPTOR_COLUMNS],
        "noise": noise, "grey": grey,
        "gap": None if noise is None or grey is None else baseline_gap(row["activation"], noise, grey),
        "top_natural": row.get("top_natural"), "ratio": row.get("superstimulus_ratio"),
        "reliability": row.get("reliability"),
        "reliability_format": _SHOWN_AS["reliability"],  # the digits the page's fingerprint compares
    }


def _format_value(name: str, value) -> str:
    if value is None:
        return "—"
    if name == "activation_trace":
        return ", ".join(f"{v:.4g}" for v in value)
    return str(value)


def _sparkline(trace: list[float], width: int = 240, height: int = 48) -> dict | None:
    """The objective during optimization, as the points of a small inline SVG (no script, no external file)."""
    if len(trace) < 2:
        return None
    low, high = min(trace), max(trace)
    span = (high - low) or 1.0
    points = " ".join(f"{i * width / (len(trace) - 1):.1f},{height - (v - low) / span * height:.1f}"
                      for i, v in enumerate(trace))
    return {"width": width, "height": height, "points": points, "low": low, "high": high,
            "first": trace[0], "last": trace[-1]}


def _front_strips(variants: dict[tuple, list[dict]], unreadable: frozenset[str]) -> list[dict]:
    """Per weights (real, then planted, then random): one thumbnail per layer, early -> late, the layer's
    most strongly activated feature (MLP features and the mean objective where the weights have them)."""
    by_weights: dict[str, list[dict]] = defaultdict(list)
    for (weights, _target, _objective, _config), rows in variants.items():
        by_weights[weights].extend(rows)
    strips = []
    for weights in sorted(by_weights, key=weights_order):
        rows = by_weights[weights]
        rows = [r for r in rows if r["target"] == "mlp"] or rows
        rows = [r for r in rows if r["objective"] == "mean"] or rows
        best: dict[int, dict] = {}
        for row in sorted(rows, key=lambda r: (-r["activation"], r["key"])):
            best.setdefault(row["layer"], row)
        strips.append({"weights": weights, "note": _weights_note(weights),
                       "thumbs": [_thumb(best[layer], unreadable) for layer in sorted(best)]})
    return strips


def _index_page(models: dict[str, dict[tuple, list[dict]]], total: int,
                unreadable: frozenset[str] = frozenset()) -> str:
    by_family: dict[str, list[str]] = defaultdict(list)
    for model, variants in models.items():
        by_family[next(iter(variants.values()))[0]["family"]].append(model)
    families = []
    for family in sorted(by_family):
        items = []
        for model in by_family[family]:
            variants = models[model]
            rows = [row for group in variants.values() for row in group]
            items.append({"name": model, "slug": model_slug(model), "images": len(rows),
                          "layers": len({row["layer"] for row in rows}), "strips": _front_strips(variants, unreadable)})
        families.append({"name": family, "models": items})
    return _render("index.html", title="vit-atlas", up="", scripts=("atlas-index.js", "atlas.js"), models=models,
                   total=total, families=families, thumb_size=THUMB_SIZE)


def _search_index(models: dict[str, dict[tuple, list[dict]]]) -> tuple[str, dict[str, str]]:
    """The search index: a script of the models and of the index's parts, and the parts (file stem -> script).

    A part holds one model's records of one layer and SEARCH_PART_FEATURES features, as compact rows
    [file slug, layer, feature, target, activation, label]; the index lists each part as [file stem,
    model#, layer, first feature, last feature, records], so a search loads only the parts its filters
    can match, and counts those they match whole without loading them.
    """
    names = list(models)
    model_rows = [[name, next(iter(models[name].values()))[0]["family"], model_slug(name)] for name in names]
    grouped: dict[tuple[int, int, int], list[dict]] = defaultdict(list)
    for number, name in enumerate(names):
        for rows in models[name].values():
            for row in rows:
                grouped[(number, row["layer"], row["feature"] // SEARCH_PART_FEATURES)].append(row)
    listed, parts = [], {}
    for (number, layer, block), rows in sorted(grouped.items()):
        stem = f"{model_rows[number][2]}-l{layer}-f{block * SEARCH_PART_FEATURES}"
        rows.sort(key=lambda r: (r["feature"], r["key"]))
        records = [[key_slug(row["key"]), row["layer"], row["feature"], row["target"], round(row["activation"], 5),
                    row["label"]] for row in rows]
        parts[stem] = (f"(window.ATLAS_PARTS = window.ATLAS_PARTS || {{}})[{json.dumps(stem)}] = "
                       f"{json.dumps(records, separators=(',', ':'))};\n")
        listed.append([stem, number, layer, rows[0]["feature"], rows[-1]["feature"], len(rows)])
    data = json.dumps({"models": model_rows, "parts": listed}, separators=(",", ":"))
    return f"window.ATLAS_INDEX = {data};\n", parts


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
