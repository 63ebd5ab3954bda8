"""The atlas: a static website of a store's visualizations, browsable from file:// or any static server.

    python -m pipeline atlas store.root=/data/atlas out=/data/atlas-site

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

``<key>`` and ``<model>`` are safe slugs (pipeline.views.slugs): the key or name itself when it
holds only ``A-Za-z0-9_-``, else those characters plus a hash, so no record can name a file
outside the site or break out of an attribute. This module is the build: it reads the store, the
manifest and the dataset examples, and writes the files, on a pool of processes. What each page
shows is pipeline.views.pages (contexts, Jinja2 templates, the search index); the thumbnails and
example overlays are pipeline.views.thumbnails.

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
import hashlib
import json
import logging
import multiprocessing
import os
import signal
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.errors import PipelineError
from pipeline.store.png import PngDecodeError, decode_png, encode_texture_png
from pipeline.store.schemas import EXAMPLES
from pipeline.views.pages import (JOINED, MEASURED_SHOWN, PAGE_COLUMNS, as_shown, directions_file, feature_page,
                                  group_models, index_page, model_pages, render, repair_hint, search_index)
from pipeline.views.readers import AtlasStore, examples_by_key, open_store
from pipeline.views.slugs import check_names, key_slug, site_file
from pipeline.views.thumbnails import example_overlay, placeholder_thumbnail, thumbnail_pixels

log = logging.getLogger(__name__)

# Part of the manifest: a site written by other page templates is rebuilt whole.
SITE_VERSION = 4  # 4: feature pages draw the un-augmented activation curve
# What makes two records the same unit under different configs (config_hash aside): a feature page shows them together.
UNIT_FIELDS = ("model", "weights", "target", "objective", "layer", "feature", "seed")
# A manifest entry that makes the next run try a key again.
_UNREADABLE = "unreadable"

_ASSETS = Path(__file__).with_name("atlas_assets")


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
    records = atlas.table(columns=PAGE_COLUMNS)
    examples = _Examples.open(atlas)

    manifest_path = out / "manifest.json"
    manifest = _read_manifest(manifest_path)
    rows = {row["key"]: row for row in records.to_pylist()}
    for joined in atlas.measurements().select(["key", *JOINED]).to_pylist():
        rows[joined["key"]].update(joined)
    check_names(rows)
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

    models = group_models(rows.values())
    pages = ((out, "models", name, "model.html", context)
             for model, variants in models.items() for name, context in model_pages(model, variants, broken))
    for _ in _in_order(pool, _write_page, pages, in_flight=2 * workers):
        pass
    _write_text(out / "index.html", index_page(models, len(rows), broken))
    index, parts = search_index(models)
    for name, text in parts.items():
        _write_text(site_file(out, "search", f"{name}.js"), text)
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
        return examples_by_key(self.dataset.to_table(filter=ds.field("key").isin(pa.array(keys, type=pa.string())),
                                                     columns=EXAMPLES.schema.names))


def _unit_configs(rows) -> dict[str, list[dict]]:
    """key -> the same unit under each config of the store, itself included, captioned with what differs;
    only for units the store holds under more than one config. Row 0 of a directions file is not channel 0,
    nor row 0 of another file: the file is part of what the unit is."""
    units: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        units[(*(row[name] for name in UNIT_FIELDS), directions_file(row["config"]))].append(row)
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
    if not isinstance(config, dict):
        return {}
    # Records since the optim/param group hold the parameterization's settings: shown by what tells their images
    # apart, its identity (MACO's spectrum by its id, not its path), with its name as optim.param as in older
    # records; auto_lr is shown as the lr it chose.
    for name in [name for name in flat if name.startswith("param_identity.")]:
        flat[f"optim.param.{name.removeprefix('param_identity.')}"] = flat.pop(name)
    if "optim.param.name" in flat:
        flat["optim.param"] = flat.pop("optim.param.name")
    return {name: value for name, value in flat.items() if not name.startswith("optim.param.auto_lr.")}


def _fingerprints(rows: dict[str, dict], examples: dict[str, str], configs: dict[str, list[dict]]) -> dict[str, str]:
    """Per key, a digest of what its page shows that can change: its examples, its measurements, and which
    configs stand beside it. A change rewrites the page. Measurements change when ``vit-atlas describe``
    measures an old record, when examples arrive (the superstimulus ratio) or another seed of the unit does
    (its reliability); siblings change when the store gains the unit under another config.

    Measurements count as the page shows them (``as_shown``): reliability is centred on the model's other
    units, so each new record moves every unit's value in its third decimal, and finer digits made a re-run
    after 1% new records rewrite every page of the model."""
    def shown(row: dict) -> list:
        return [as_shown(name, row.get(name)) for name in MEASURED_SHOWN]

    return {key: hashlib.sha256(repr((examples.get(key, ""), shown(row),
                                      [c["key"] for c in configs.get(key, [])])).encode()).hexdigest()[:16]
            for key, row in rows.items()}




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
        site_file(out, "thumbs", f"{slug}.png").write_bytes(placeholder_thumbnail())
        site_file(out, "images", f"{slug}.png").unlink(missing_ok=True)  # an image from before it broke
    else:
        problem = None
        site_file(out, "images", f"{slug}.png").write_bytes(png)
        site_file(out, "thumbs", f"{slug}.png").write_bytes(encode_texture_png(thumbnail_pixels(pixels)))
    shown = []
    for example in examples:
        try:
            overlay = example_overlay(example)
        except PngDecodeError as error:
            log.warning("The dataset example %r (rank %s) of record %r has a thumbnail that does not decode: %s; "
                        "it is left out of the feature page. Re-run `vit-atlas examples` to recompute it.",
                        example["image_id"], example["rank"], row["key"], error)
            continue
        overlay.save(site_file(out, "examples", f"{slug}-r{int(example['rank'])}.jpg"), format="JPEG", quality=85)
        shown.append(example)
    _write_text(site_file(out, "features", f"{slug}.html"), feature_page(row, shown, problem, configs))
    return problem


def _unreadable_warning(row: dict, problem: str, store_root: str) -> str:
    return (f"Record {row['key']!r} ({row['model']}, weights {row['weights']}, layer {row['layer']}, feature "
            f"{row['feature']}) has an image that does not decode: {problem}. The atlas shows a placeholder for it. "
            + repair_hint(store_root))








def _write_page(out: Path, folder: str, name: str, template: str, context: dict) -> None:
    _write_text(site_file(out, folder, f"{name}.html"), render(template, **context))


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
