"""The atlas's pages as data and HTML: grouping records into models and variants, each page's template
context, the Jinja2 rendering, and the search index. Nothing here reads a store or writes a file; the
build (pipeline.views.atlas) hands these functions records and writes what they return.

- :func:`group_models`: records -> model -> variant (weights, target, objective, config) -> records;
- :func:`model_pages`, :func:`feature_page`, :func:`index_page`: the pages (``render`` for a context);
- :func:`search_index`: the search index script and its parts.

Pages are Jinja2 templates (``templates/``, one base layout) rendered with autoescaping, so every
text from the store is escaped where it lands.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import PurePath

import jinja2
import markupsafe

from pipeline.models.weights_id import WeightsId
from pipeline.store.errors import repair_command
from pipeline.store.schemas import BASELINE_COLUMNS, CURVE_COLUMN, DESCRIPTOR_COLUMNS, EMBEDDING_COLUMN
from pipeline.views.readers import METADATA_COLUMNS
from pipeline.views.slugs import key_slug, model_slug
from pipeline.views.thumbnails import THUMB_SIZE

# A variant of a model with more images than this gets its grid on pages of one layer and at most
# PAGE_FEATURES features each, linked from the model's page: one grid of a wide model (37,000 MLP features
# of deit_base) is megabytes of HTML, a DOM no browser keeps responsive.
MODEL_PAGE_IMAGES = 1024
PAGE_FEATURES = 256
# Features of a layer per file of the search index (search/), so a search loads only the files that can match.
SEARCH_PART_FEATURES = 256
# The atlas leaves the embedding to the readers (reliability): hundreds of floats per record, nothing to show.
PAGE_COLUMNS = [name for name in METADATA_COLUMNS if name != EMBEDDING_COLUMN]
# What a layer's features can be sorted and filtered by on the model page, and what the feature page shows.
SORTABLE = ("activation", "superstimulus_ratio", "reliability", *DESCRIPTOR_COLUMNS, *BASELINE_COLUMNS)
JOINED = ("top_natural", "superstimulus_ratio", "reliability")  # per record, from AtlasStore.measurements()
MEASURED_SHOWN = (*DESCRIPTOR_COLUMNS, *BASELINE_COLUMNS, *JOINED)
# How the feature page shows a measurement (measurements.html takes reliability's from here); the others
# to at most 4 significant digits.
_SHOWN_AS = {"reliability": ".2f"}


def repair_hint(root: str) -> str:
    """What to do about a record of the store at ``root`` whose image does not decode."""
    return (f"Verify and repair the store (`{repair_command(root)}`), or re-run the sweep that made the record "
            "to recompute it.")


def as_shown(name: str, value):
    return format(value, _SHOWN_AS.get(name, ".4g")) if isinstance(value, float) else value


def group_models(rows) -> dict[str, dict[tuple, list[dict]]]:
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
    environment.filters["count"] = count
    environment.filters["fmt"] = format
    environment.filters["text"] = _element_text
    return environment


def _element_text(value: str) -> markupsafe.Markup:
    """Escaped for an element's content only (``<``, ``>``, ``&``), leaving quotes readable, as in a <pre>
    of JSON. Never for an attribute value: autoescaping (which also escapes quotes) is for those."""
    return markupsafe.Markup(html.escape(str(value), quote=False))


def render(template: str, **context) -> str:
    return _environment().get_template(template).render(**context)


def _thumb(row: dict, unreadable: frozenset[str] = frozenset()) -> dict:
    alt = f"{row['model']} layer {row['layer']} feature {row['feature']}" + (f" ({row['label']})" if row["label"] else "")
    return {"slug": key_slug(row["key"]), "alt": alt, "layer": row["layer"], "unreadable": row["key"] in unreadable}


def _variant_title(variant: tuple) -> str:
    weights, target, objective, config_hash = variant
    return f"weights {weights} · target {target} · objective {objective} · config {config_hash}"


@functools.lru_cache(maxsize=1024)
def directions_file(config: str) -> str | None:
    """The name of the directions file whose row a record's unit is (``target.directions``), from the record's
    config; None for a unit that is a channel. Cached: a group's records share one config text, and the atlas
    and figures ask for every record's."""
    try:
        directions = json.loads(config).get("directions")
    except (json.JSONDecodeError, TypeError, AttributeError):
        return None
    return PurePath(directions["path"]).name if isinstance(directions, dict) and directions.get("path") else None


def unit_name(row: dict) -> str:
    """What a record's unit is, in words: 'feature N' (a channel) or 'direction N of FILE' (row N of a file)."""
    source = directions_file(row["config"])
    return f"direction {row['feature']} of {source}" if source else f"feature {row['feature']}"


def weights_kind(weights: str) -> str:
    """pretrained | file | planted | random | other, from a record's weights id."""
    found = WeightsId.parse_or_none(weights)
    return found.kind if found else "other"
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


def model_pages(model: str, variants: dict[tuple, list[dict]],
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
        source = directions_file(rows[0]["config"])  # one config hash: one directions file, or none
        title = _variant_title(variant) + (f" · units: the directions of {source}" if source else "")
        section = {"title": title, "note": _weights_note(variant[0]), "images": len(rows),
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


def _cell_values(rows: list[dict]) -> dict[str, str]:
    """A grid cell's sort keys: per measurement, the mean over the cell's records (its seeds) where measured."""
    values = {}
    for name in SORTABLE:
        found = [value for row in rows if (value := row.get(name)) is not None and math.isfinite(value)]
        if found:
            values[name] = format(sum(found) / len(found), ".6g")
    return values


def feature_page(row: dict, examples: list[dict], unreadable: str | None = None,
                  configs: list[dict] = ()) -> str:
    unit = unit_name(row)
    title = f"{row['model']} · layer {row['layer']} · {unit}"
    try:
        config = json.dumps(json.loads(row["config"]), indent=2, sort_keys=True)
    except (json.JSONDecodeError, TypeError):
        config = str(row["config"])
    return render(
        "feature.html", title=f"{title} · vit-atlas", up="../", scripts=(), row=row, heading=title,
        slug=key_slug(row["key"]), model_slug=model_slug(row["model"]), note=_weights_note(row["weights"]),
        unit=unit, unreadable=unreadable, repair_command=repair_command("STORE"),
        **_lines(row), config=config,
        configs=[{**c, "current": c["key"] == row["key"]} for c in configs], thumb_size=THUMB_SIZE,
        examples=[{"rank": int(e["rank"]), "image_id": e["image_id"], "activation": e["activation"]} for e in examples],
        provenance=[(name, _format_value(name, row[name])) for name in PAGE_COLUMNS
                    if name != "config" and name not in MEASURED_SHOWN],
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
    if name in ("activation_trace", CURVE_COLUMN):
        return ", ".join(f"{v:.4g}" for v in value)
    return str(value)


def _lines(row: dict) -> dict:
    """The feature page's lines during optimization: ``curve``, the un-augmented image's activation (rising to
    the activation the page states), and ``trace``, the optimizer's own objective, the augmented copies' mean
    score. The trace stays, smaller, below the curve: it is what Adam maximized, and its distance from the curve
    says how differently the unit answers the jittered, noised, colour-shifted copies than the image itself. A
    record written before record schema v3 has no curve and shows its trace alone, labelled as that objective."""
    curve = row.get(CURVE_COLUMN)
    return {"curve": _sparkline(curve) if curve is not None else None,
            "trace": _sparkline(row["activation_trace"], height=24 if curve is not None else 48)}


def _sparkline(values: list[float], width: int = 240, height: int = 48) -> dict | None:
    """A line during optimization as the points of a small inline SVG (no script, no external file)."""
    if len(values) < 2:
        return None
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    points = " ".join(f"{i * width / (len(values) - 1):.1f},{height - (v - low) / span * height:.1f}"
                      for i, v in enumerate(values))
    return {"width": width, "height": height, "points": points, "low": low, "high": high,
            "first": values[0], "last": values[-1]}


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


def index_page(models: dict[str, dict[tuple, list[dict]]], total: int,
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
    return render("index.html", title="vit-atlas", up="", scripts=("atlas-index.js", "atlas.js"), models=models,
                   total=total, families=families, thumb_size=THUMB_SIZE)


def search_index(models: dict[str, dict[tuple, list[dict]]]) -> tuple[str, dict[str, str]]:
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


def count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
