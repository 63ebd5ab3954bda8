"""The atlas: a static website of a store's visualizations, browsable from file:// or any static server.

    python -m pipeline.atlas store.root=/data/atlas out=/data/atlas-site

Layout of the site::

    index.html              models by family, each with its layer strip; client-side search
    models/<model>.html      per model (and weights/target/objective/config): layers x features, early -> late
    features/<key>.html      one visualization: image, activation, label, provenance, dataset examples
    images/<key>.png         the record's image as stored
    thumbs/<key>.jpg         small thumbnails the grids and search show (lazy-loaded)
    examples/<key>-r<rank>.jpg   dataset examples with their activation map overlaid, if the store has them
    atlas-index.js           the search index as a script that sets a global, since fetch() of a
                             local JSON file is refused under file://
    manifest.json            which keys have their pages, so a re-run writes only new ones

Pages, images and thumbnails of a key are written once; a re-run writes those
of new keys (and of keys whose dataset examples changed), then rewrites the
index, model pages and search index, which summarise every key. The manifest is
written last, so an interrupted run is completed by the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import os
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from PIL import Image

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.store.schemas import EXAMPLES
from pipeline.views.readers import METADATA_COLUMNS, AtlasStore, open_store

# Part of the manifest: a site written by other page templates is rebuilt whole.
SITE_VERSION = 1
THUMB_SIZE = 96
EXAMPLE_SIZE = 128
USAGE = "usage: python -m pipeline.atlas store.root=DIR out=SITE_DIR"

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_ASSETS = Path(__file__).with_name("atlas_assets")


@dataclasses.dataclass(frozen=True)
class BuildReport:
    records: int
    models: int
    pages_written: int
    pages_kept: int
    index: Path


def model_slug(model: str) -> str:
    """A file name for a model page; names with '/', ':' or '.' get a hash so two never collide."""
    slug = _SLUG_UNSAFE.sub("_", model)
    return slug if slug == model else f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def build_site(store_root: str, out: str | Path, workers: int | None = None) -> BuildReport:
    """Write (or bring up to date) the atlas site of a store."""
    atlas = open_store(store_root)
    out = Path(out)
    _check_out(out)
    records = atlas.table(columns=METADATA_COLUMNS)
    examples = _Examples.open(atlas)

    manifest_path = out / "manifest.json"
    manifest = _read_manifest(manifest_path)
    fingerprints = examples.fingerprints()
    rows = {row["key"]: row for row in records.to_pylist()}
    pending = [key for key in rows
               if manifest.get(key) != fingerprints.get(key, "") or not (out / "features" / f"{key}.html").exists()]

    for folder in ("features", "images", "thumbs", "examples", "models"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    if not manifest_path.exists():  # marks the directory as an atlas, so an interrupted first run can resume
        _write_manifest(manifest_path, {})
    _write_pages(atlas, out, rows, pending, examples, workers or min(4, os.cpu_count() or 1))

    models = _group_models(rows.values())
    for model, variants in models.items():
        _write_text(out / "models" / f"{model_slug(model)}.html", _model_page(model, variants))
    _write_text(out / "index.html", _index_page(models, len(rows)))
    _write_text(out / "atlas-index.js", _search_index(models))
    for asset in ("atlas.css", "atlas.js"):
        _write_text(out / asset, (_ASSETS / asset).read_text())
    _write_manifest(manifest_path, {key: fingerprints.get(key, "") for key in rows})
    return BuildReport(len(rows), len(models), len(pending), len(rows) - len(pending), out / "index.html")


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


def _group_models(rows) -> dict[str, dict[tuple, list[dict]]]:
    """model -> variant (weights, target, objective, config_hash) -> records, models and variants sorted."""
    models: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        models[row["model"]][(row["weights"], row["target"], row["objective"], row["config_hash"])].append(row)
    return {model: {variant: models[model][variant] for variant in sorted(models[model], key=_variant_order)}
            for model in sorted(models)}


def _variant_order(variant: tuple) -> tuple:
    weights, target, objective, config_hash = variant
    return (target != "mlp", target, weights, objective, config_hash)  # MLP features, the interpretable ones, first


# ------------------------------------------------------------------ per-key files


def _write_pages(atlas: AtlasStore, out: Path, rows: dict[str, dict], pending: list[str], examples: _Examples,
                 workers: int) -> None:
    """Images, thumbnails, example overlays and the feature page of each pending key, in bounded batches."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in atlas.keyed_batches(pending, columns=["key", "png"], batch_size=128):
            keys = batch.column("key").to_pylist()
            batch_examples = examples.for_keys(keys)
            jobs = [pool.submit(_write_key, out, rows[key], png, batch_examples.get(key, []))
                    for key, png in zip(keys, batch.column("png").to_pylist())]
            for job in jobs:
                job.result()


def _write_key(out: Path, row: dict, png: bytes, examples: list[dict]) -> None:
    key = row["key"]
    (out / "images" / f"{key}.png").write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    image.save(out / "thumbs" / f"{key}.jpg", format="JPEG", quality=85)
    for example in examples:
        _example_overlay(example).save(out / "examples" / f"{key}-r{example['rank']}.jpg", format="JPEG", quality=85)
    _write_text(out / "features" / f"{key}.html", _feature_page(row, examples))


def _example_overlay(example: dict) -> Image.Image:
    """The example image with its activation map laid over it in red, brighter where the feature fires."""
    rows, cols, values = example["grid_rows"], example["grid_cols"], example["activation_map"]
    if rows * cols != len(values):
        raise PipelineError(
            f"The dataset example {example['image_id']!r} of {example['key']!r} has an activation map of "
            f"{len(values)} values for a {rows}x{cols} grid. Each map must hold grid_rows * grid_cols values, "
            "row by row; fix the examples table."
        )
    image = Image.open(io.BytesIO(example["thumbnail"])).convert("RGB")
    image.thumbnail((EXAMPLE_SIZE, EXAMPLE_SIZE), Image.Resampling.LANCZOS)
    heat = np.asarray(values, dtype=np.float64).reshape(rows, cols)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    alpha = Image.fromarray((heat * 160).astype(np.uint8), mode="L").resize(image.size, Image.Resampling.BILINEAR)
    red = Image.new("RGB", image.size, (255, 32, 0))
    return Image.composite(red, image, alpha)


# ------------------------------------------------------------------ pages


def _page(title: str, body: str, depth: int, scripts: tuple[str, ...] = ()) -> str:
    up = "../" * depth
    tags = "".join(f'<script src="{up}{name}" defer></script>' for name in scripts)
    # The empty icon stops browsers requesting /favicon.ico, a 404 (and console error) on static servers.
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f'<link rel="stylesheet" href="{up}atlas.css">{tags}</head>\n<body>\n'
        f'<nav><a href="{up}index.html">vit-atlas</a></nav>\n{body}\n</body></html>\n'
    )


def _thumb(row: dict, depth: int, size: int = 64) -> str:
    up = "../" * depth
    alt = f"{row['model']} layer {row['layer']} feature {row['feature']}" + (f" ({row['label']})" if row["label"] else "")
    return (f'<a href="{up}features/{row["key"]}.html" title="{html.escape(alt)}">'
            f'<img src="{up}thumbs/{row["key"]}.jpg" loading="lazy" width="{size}" height="{size}" '
            f'alt="{html.escape(alt)}"></a>')


def _variant_title(variant: tuple) -> str:
    weights, target, objective, config_hash = variant
    return f"weights {weights} · target {target} · objective {objective} · config {config_hash}"


def _model_page(model: str, variants: dict[tuple, list[dict]]) -> str:
    family = next(iter(variants.values()))[0]["family"]
    sections = []
    for variant, rows in variants.items():
        layers = sorted({row["layer"] for row in rows})
        features = sorted({row["feature"] for row in rows})
        cells: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for row in sorted(rows, key=lambda r: (r["seed"], r["key"])):
            cells[(row["layer"], row["feature"])].append(row)
        header = "".join(f'<th data-feature="{f}">{f}</th>' for f in features)
        body = []
        for layer in layers:
            tds = "".join(
                f'<td data-feature="{f}">{"".join(_thumb(r, 1) for r in cells.get((layer, f), []))}</td>'
                for f in features)
            body.append(f'<tr data-layer="{layer}"><th scope="row">layer {layer}</th>{tds}</tr>')
        sections.append(
            f'<section class="variant"><h2>{html.escape(_variant_title(variant))}</h2>'
            f'<p class="muted">{_count(len(rows), "image")}, {_count(len(layers), "layer")} × '
            f'{_count(len(features), "feature")}; '
            'rows run from early (top) to late layers.</p>'
            f'<div class="grid-scroll"><table class="grid"><thead><tr><th>feature →</th>{header}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>'
        )
    total = sum(len(rows) for rows in variants.values())
    controls = (
        '<form class="filters" id="grid-filter" onsubmit="return false">'
        '<label>layers <input id="filter-layer" name="layer" placeholder="e.g. 0-3,11"></label>'
        '<label>features <input id="filter-feature" name="feature" placeholder="e.g. 0-15"></label>'
        f'<output id="filter-count">{total} images</output></form>'
    )
    body = (f'<h1>{html.escape(model)}</h1><p class="muted">family {html.escape(family)} · {total} images</p>'
            f'{controls}{"".join(sections)}')
    return _page(f"{model} · vit-atlas", body, 1, ("atlas.js",))


def _feature_page(row: dict, examples: list[dict]) -> str:
    model_href = f"../models/{model_slug(row['model'])}.html"
    title = f"{row['model']} · layer {row['layer']} · feature {row['feature']}"
    label = f'<p class="label">{html.escape(row["label"])}</p>' if row["label"] else ""
    provenance = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(_format_value(name, row[name]))}</td></tr>"
        for name in METADATA_COLUMNS if name != "config")
    try:
        config = json.dumps(json.loads(row["config"]), indent=2, sort_keys=True)
    except json.JSONDecodeError:
        config = row["config"]
    example_html = ""
    if examples:
        figures = "".join(
            f'<figure><img src="../examples/{row["key"]}-r{e["rank"]}.jpg" loading="lazy" '
            f'alt="dataset example {html.escape(e["image_id"])}"><figcaption>#{e["rank"]} '
            f'{html.escape(e["image_id"])}<br>activation {e["activation"]:.4g}</figcaption></figure>'
            for e in examples)
        example_html = (f'<section><h2>Top dataset examples</h2><p class="muted">Activation map overlaid in red '
                        f'(brighter = stronger).</p><div class="examples">{figures}</div></section>')
    body = (
        f'<p class="crumbs"><a href="{model_href}">{html.escape(row["model"])}</a> › layer {row["layer"]} › '
        f'feature {row["feature"]}</p><h1>{html.escape(title)}</h1>{label}'
        f'<div class="feature"><img class="visualization" src="../images/{row["key"]}.png" '
        f'width="{row["image_size"]}" height="{row["image_size"]}" alt="{html.escape(title)}">'
        f'<div><p class="activation">activation <strong>{row["activation"]:.6g}</strong> after '
        f'{row["steps"]} steps</p>{_sparkline(row["activation_trace"])}</div></div>'
        f'{example_html}<section><h2>Provenance</h2><table class="provenance">{provenance}</table>'
        f'<h3>config</h3><pre>{html.escape(config, quote=False)}</pre></section>'
    )
    return _page(f"{title} · vit-atlas", body, 1)


def _format_value(name: str, value) -> str:
    if value is None:
        return "—"
    if name == "activation_trace":
        return ", ".join(f"{v:.4g}" for v in value)
    return str(value)


def _sparkline(trace: list[float], width: int = 240, height: int = 48) -> str:
    """The objective during optimization as a small inline SVG (no script, no external file)."""
    if len(trace) < 2:
        return ""
    low, high = min(trace), max(trace)
    span = (high - low) or 1.0
    points = " ".join(f"{i * width / (len(trace) - 1):.1f},{height - (v - low) / span * height:.1f}"
                      for i, v in enumerate(trace))
    return (f'<svg class="trace" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="objective during optimization, {low:.3g} to {high:.3g}">'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/></svg>'
            f'<p class="muted">objective during optimization: {trace[0]:.4g} → {trace[-1]:.4g} '
            f'(range {low:.4g} to {high:.4g})</p>')


def _layer_strip(variants: dict[tuple, list[dict]]) -> str:
    """One thumbnail per layer, early -> late, from the variant that covers the most layers (MLP first)."""
    rows = max(variants.items(), key=lambda item: (item[0][1] == "mlp", len({r["layer"] for r in item[1]})))[1]
    first_per_layer: dict[int, dict] = {}
    for row in sorted(rows, key=lambda r: (r["layer"], r["feature"], r["key"])):
        first_per_layer.setdefault(row["layer"], row)
    return "".join(_thumb(first_per_layer[layer], 0, 48) for layer in sorted(first_per_layer))


def _index_page(models: dict[str, dict[tuple, list[dict]]], total: int) -> str:
    by_family: dict[str, list[str]] = defaultdict(list)
    for model, variants in models.items():
        by_family[next(iter(variants.values()))[0]["family"]].append(model)
    families = []
    for family in sorted(by_family):
        items = []
        for model in by_family[family]:
            variants = models[model]
            rows = [row for group in variants.values() for row in group]
            layers = len({row["layer"] for row in rows})
            items.append(
                f'<li class="model" data-model="{html.escape(model)}"><a href="models/{model_slug(model)}.html">'
                f'{html.escape(model)}</a> <span class="muted">{_count(len(rows), "image")} · {_count(layers, "layer")}</span>'
                f'<div class="strip">{_layer_strip(variants)}</div></li>')
        families.append(f'<section class="family"><h2>{html.escape(family)}</h2><ul>{"".join(items)}</ul></section>')
    options = "".join(f'<option value="{html.escape(f)}">{html.escape(f)}</option>' for f in sorted(by_family))
    search = (
        '<form class="filters" id="search" onsubmit="return false"><h2>Search</h2>'
        '<label>model <input id="search-model" placeholder="part of a name"></label>'
        f'<label>family <select id="search-family"><option value="">any</option>{options}</select></label>'
        '<label>layers <input id="search-layer" placeholder="e.g. 0-3,11"></label>'
        '<label>features <input id="search-feature" placeholder="e.g. 7"></label>'
        '<output id="search-count"></output></form><div id="search-results" class="results"></div>'
    )
    body = (f'<h1>vit-atlas</h1><p class="muted">{total} feature visualizations of {len(models)} models. '
            f'Each strip runs from the first to the last layer.</p>{search}{"".join(families)}')
    return _page("vit-atlas", body, 0, ("atlas-index.js", "atlas.js"))


def _search_index(models: dict[str, dict[tuple, list[dict]]]) -> str:
    """The search index as a script: compact rows [key, model#, layer, feature, target, activation, label]."""
    names = list(models)
    model_rows = [[name, next(iter(models[name].values()))[0]["family"], model_slug(name)] for name in names]
    records = [[row["key"], number, row["layer"], row["feature"], row["target"], round(row["activation"], 5),
                row["label"]]
               for number, name in enumerate(names) for rows in models[name].values() for row in rows]
    data = json.dumps({"models": model_rows, "records": records}, separators=(",", ":"))
    return f"window.ATLAS_INDEX = {data};\n"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
