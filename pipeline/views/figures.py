"""Paper-style figures from a store, as PNG and PDF.

    python -m pipeline figures store.root=/data/atlas out=/data/figures [model=a,b] [target=mlp]

- ``progression.{png,pdf}``: the layer-progression strip of the paper's Figure 1:
  one row per (model, weights) (per model: real weights, then planted, then random),
  ``per_layer`` rows of them for the most activated features, strongest first,
  one column per layer visualized anywhere in the figure, early to late, headed by
  the layer; each panel is that layer's most strongly activated visualized feature,
  and a row without the layer leaves its cell empty, so a column is one depth.
  Rows of random weights say that they are a baseline expected to look like noise.
- ``contact-<model>-<weights>-l<layer>[-<directions>].{png,pdf}``: a contact sheet per layer, every
  visualized feature of that layer in feature order (the first MAX_CONTACT_FEATURES); the rows of a
  directions file (``target.directions``) get a sheet of their own, named after the file.
- ``examples-<model>-<weights>-l<layer>[-<directions>].{png,pdf}``: beside each unit's image (its
  activation captioned with uniform noise's and mean grey's), the dataset images that excite it most
  (``vit-atlas examples``); drawn for the layers whose units have examples.
- ``descriptors-depth.{png,pdf}``: each image descriptor (docs/store.md) against depth, one
  panel per descriptor: per (model, weights) the median over the layer's records (every
  feature, seed and config) with the interquartile range shaded, at relative depth
  layer / (L - 1) so that models of different depths overlay. Drawn when the store holds
  measured records (v2; ``vit-atlas describe`` measures older ones) of >= 2 layers.

Where several records share (model, weights, layer, unit) (seeds, configs),
the one with the highest activation is shown. A record whose PNG does not decode
is drawn as a labelled placeholder, with a warning naming it and the repair. The
figure builders return the matplotlib Figure before anything is saved, so callers
can restyle or inspect it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container
from pathlib import Path, PurePath

import numpy as np
from matplotlib.figure import Figure

from pipeline.errors import PipelineError
from pipeline.models.weights_id import short_id
from pipeline.store.png import PngDecodeError, decode_png
from pipeline.store.schemas import DESCRIPTOR_COLUMNS
from pipeline.views.pages import directions_file, repair_hint, weights_kind, weights_order
from pipeline.views.slugs import model_slug
from pipeline.views.readers import AtlasStore, open_store

log = logging.getLogger(__name__)

MAX_CONTACT_FEATURES = 64
PANEL_INCHES = 1.3
RANDOM_CAPTION = "random weights: expected noise"
MAX_EXAMPLE_UNITS = 8  # rows of an examples figure: a layer's first units (in feature order) with examples
MAX_EXAMPLES_SHOWN = 6  # each unit's top dataset examples beside its image
_SELECT_COLUMNS = ["key", "model", "weights", "layer", "feature", "activation", "activation_noise",
                   "activation_grey", "config"]


def _best_per_feature(atlas: AtlasStore, models: list[str] | None, target: str) -> list[dict]:
    """One record per (model, weights, layer, source, feature): the highest activation, ties broken by key.
    ``source`` (added to each row) is the directions file whose rows the units are, None for channels: row 3 of
    a PCA is not channel 3, so the two never stand for each other."""
    table = atlas.table(columns=_SELECT_COLUMNS, model=models, target=target)
    if not table.num_rows:
        scope = f"models {', '.join(models)}" if models else "any model"
        raise PipelineError(
            f"The store at {atlas.root!r} has no records of target {target!r} for {scope}. Check the model "
            "names and target against the store (`pipeline.views.readers.open_store(root).frame()` lists them)."
        )
    best: dict[tuple, dict] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (-r["activation"], r["key"])):
        row["source"] = directions_file(row["config"])
        best.setdefault((row["model"], row["weights"], row["layer"], row["source"] or "", row["feature"]), row)
    return sorted(best.values(), key=lambda r: (r["model"], r["weights"], r["layer"], r["source"] or "", r["feature"]))


def _unit(row: dict) -> str:
    """A panel's short name of its unit: f3 (channel 3) or d3 (row 3 of a directions file)."""
    return f"{'d' if row['source'] else 'f'}{row['feature']}"


def _images(atlas: AtlasStore, rows: list[dict]) -> dict[str, np.ndarray | None]:
    """Pixels by key; None (after a warning naming the record and the repair) where the PNG does not decode."""
    models = sorted({row["model"] for row in rows})
    by_key = {row["key"]: row for row in rows}
    images: dict[str, np.ndarray | None] = {}
    for batch in atlas.keyed_batches(list(by_key), columns=["key", "png"], model=models):
        for key, png in zip(batch.column("key").to_pylist(), batch.column("png").to_pylist()):
            try:
                images[key] = decode_png(png)
            except PngDecodeError as error:
                row = by_key[key]
                log.warning("Record %r (%s, weights %s, layer %s, feature %s) has an image that does not decode: "
                            "%s. The figure shows a placeholder for it. %s", key, row["model"], row["weights"],
                            row["layer"], row["feature"], error, repair_hint(atlas.root))
                images[key] = None
    return images


def _panel(axes, image: np.ndarray | None, title: str) -> None:
    if image is None:  # an undecodable record: a labelled grey square, never a blank that reads as "none"
        axes.set_facecolor("#d0d0d0")
        axes.text(0.5, 0.5, "image does\nnot decode", ha="center", va="center", fontsize=6, color="#a02020",
                  transform=axes.transAxes)
    else:
        axes.imshow(image, interpolation="nearest")
    axes.set_title(title, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(image is None)


def progression_figure(atlas: AtlasStore, models: list[str] | None = None, target: str = "mlp",
                       per_layer: int = 1) -> Figure:
    """One row per (model, weights) and rank, one column per layer (early, left, to late), empty where a row
    lacks it: row r of a (model, weights) shows each layer's r-th most activated feature, r < ``per_layer``."""
    if per_layer < 1:
        raise PipelineError(f"per_layer={per_layer} must be at least 1: the features shown per layer and row.")
    rows = _best_per_feature(atlas, models, target)
    ranked: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (-r["activation"], r["key"])):
        ranked.setdefault((row["model"], row["weights"], row["source"] or "", row["layer"]), []).append(row)
    strips: dict[tuple, dict[int, dict]] = {}
    for (model, weights, source, layer), best in ranked.items():
        for rank, row in enumerate(best[:per_layer]):
            strips.setdefault((model, weights, source, rank), {})[layer] = row
    order = sorted(strips, key=lambda item: (item[0], weights_order(item[1]), item[2], item[3]))
    layers = sorted({layer for strip in strips.values() for layer in strip})
    images = _images(atlas, [row for strip in strips.values() for row in strip.values()])

    # A fixed layout (inches), so the column headers and row captions can be placed before drawing.
    labels = [f"{model}\n{short_id(weights)}" + (f"\ndirections {source}" if source else "") if rank == 0 else ""
              for model, weights, source, rank in order]
    left = max(1.2, 0.065 * max(len(line) for label in labels for line in label.split("\n")) + 0.3)
    right, top, bottom, wspace, hspace = 0.15, 0.75, 0.15, 0.08, 0.3
    columns, lines = len(layers), len(order)
    width = left + right + PANEL_INCHES * (columns + wspace * (columns - 1))
    height = top + bottom + PANEL_INCHES * (lines + hspace * (lines - 1))
    figure = Figure(figsize=(width, height))
    grid = figure.add_gridspec(lines, columns, left=left / width, right=1 - right / width, top=1 - top / height,
                               bottom=bottom / height, wspace=wspace, hspace=hspace)
    for number, ((model, weights, source, rank), label) in enumerate(zip(order, labels)):
        strip = strips[(model, weights, source, rank)]
        first = None
        for column, layer in enumerate(layers):
            if layer not in strip:
                continue  # this row has no visualization of this layer: the cell stays empty
            axes = figure.add_subplot(grid[number, column])
            row = strip[layer]
            _panel(axes, images.get(row["key"]), f"layer {layer} · {_unit(row)}")
            if first is None:
                first = (axes, column)
        axes, column = first
        axes.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        # The row's label sits left of column 0 even when its first panel is further right.
        axes.yaxis.set_label_coords(-column * (1 + wspace) - 0.06, 0.5)
        if weights_kind(weights) == "random" and rank == 0:
            cell = grid[number, 0].get_position(figure)
            figure.text(cell.x0 - 0.06 * cell.width, cell.y0 + 0.2 * cell.height, RANDOM_CAPTION, fontsize=6,
                        style="italic", color="#a04040", ha="right", va="center")
    for column, layer in enumerate(layers):
        cell = grid[0, column].get_position(figure)
        figure.text((cell.x0 + cell.x1) / 2, cell.y1 + 0.3 / height, f"layer {layer}", fontsize=8,
                    fontweight="bold", ha="center", va="bottom")
    figure.suptitle(f"Feature progression, early → late layers ({target})", fontsize=9, y=1 - 0.12 / height,
                    va="top")
    return figure


def _layer_rows(atlas: AtlasStore, model: str, weights: str, layer: int, target: str, source: str | None
                ) -> list[dict]:
    """The best record of each unit of one layer (of ``source``'s directions, or channels), in feature order."""
    rows = [row for row in _best_per_feature(atlas, [model], target)
            if row["weights"] == weights and row["layer"] == layer and row["source"] == source]
    if not rows:
        units = f"records of the directions of {source}" if source else "records"
        raise PipelineError(
            f"The store at {atlas.root!r} has no {target} {units} of {model!r} with weights {weights!r} at "
            f"layer {layer}; pick a layer the store holds."
        )
    return rows


def _sheet_title(model: str, weights: str, layer: int, target: str, source: str | None) -> str:
    return f"{model} · {short_id(weights)} · layer {layer} ({target})" + (f"\ndirections of {source}" if source else "")


def contact_sheet_figure(atlas: AtlasStore, model: str, weights: str, layer: int, target: str = "mlp",
                         source: str | None = None) -> Figure:
    """Every visualized unit of one layer (the first MAX_CONTACT_FEATURES), in feature order: channels, or with
    ``source`` the rows of that directions file (its name, as records cite it)."""
    rows = _layer_rows(atlas, model, weights, layer, target, source)[:MAX_CONTACT_FEATURES]
    return _contact_sheet(atlas, rows, _sheet_title(model, weights, layer, target, source), source)


def _contact_sheet(atlas: AtlasStore, rows: list[dict], title: str, source: str | None) -> Figure:
    images = _images(atlas, rows)
    columns = math.ceil(math.sqrt(len(rows)))
    lines = math.ceil(len(rows) / columns)
    figure = Figure(figsize=(PANEL_INCHES * columns, (PANEL_INCHES + 0.2) * lines + 0.4), layout="constrained")
    for position, axes in enumerate(figure.subplots(lines, columns, squeeze=False).flat):
        if position >= len(rows):
            figure.delaxes(axes)
            continue
        row = rows[position]
        _panel(axes, images.get(row["key"]), f"{'direction' if source else 'feature'} {row['feature']}")
    figure.suptitle(title, fontsize=9)
    return figure


def examples_figure(atlas: AtlasStore, model: str, weights: str, layer: int, target: str = "mlp",
                    source: str | None = None) -> Figure:
    """Each unit of one layer that has dataset examples (the first MAX_EXAMPLE_UNITS, in feature order), a row
    each: its visualization, captioned with its activation beside uniform noise's and mean grey's, then its top
    MAX_EXAMPLES_SHOWN examples (``vit-atlas examples``), each with its activation."""
    rows = _layer_rows(atlas, model, weights, layer, target, source)
    rows = _units_shown_with_examples(rows, atlas.top_natural([row["key"] for row in rows]))
    if not rows:
        raise PipelineError(
            f"The store at {atlas.root!r} has no dataset examples for layer {layer} of {model!r} ({short_id(weights)}"
            f"). Run `vit-atlas examples store.root={atlas.root} images.path=DIR` first."
        )
    return _examples_sheet(atlas, rows, _sheet_title(model, weights, layer, target, source), source)


def _units_shown_with_examples(rows: list[dict], with_examples: Container[str]) -> list[dict]:
    """The first MAX_EXAMPLE_UNITS of ``rows`` whose keys have dataset examples: an examples sheet's rows."""
    return [row for row in rows if row["key"] in with_examples][:MAX_EXAMPLE_UNITS]


def _examples_sheet(atlas: AtlasStore, rows: list[dict], title: str, source: str | None) -> Figure:
    examples = atlas.examples(row["key"] for row in rows)  # thumbnails: of the units shown only
    images = _images(atlas, rows)
    columns = 1 + min(MAX_EXAMPLES_SHOWN, max(len(examples[row["key"]]) for row in rows))
    figure = Figure(figsize=(PANEL_INCHES * columns + 0.8, (PANEL_INCHES + 0.35) * len(rows) + 0.5),
                    layout="constrained")
    for row, panels in zip(rows, figure.subplots(len(rows), columns, squeeze=False)):
        noise, grey = row["activation_noise"], row["activation_grey"]
        baselines = "" if noise is None or grey is None else f"\nnoise {noise:.3g} · grey {grey:.3g}"
        _panel(panels[0], images.get(row["key"]), f"drawn: {row['activation']:.3g}{baselines}")
        panels[0].set_ylabel(f"{'direction' if source else 'feature'} {row['feature']}", fontsize=8)
        found = examples[row["key"]][:columns - 1]
        for axes, example in zip(panels[1:], found):
            try:
                pixels = decode_png(example["thumbnail"])
            except PngDecodeError as error:
                log.warning("The dataset example %r (rank %s) of record %r has a thumbnail that does not decode: "
                            "%s. Re-run `vit-atlas examples` to recompute it.", example["image_id"],
                            example["rank"], row["key"], error)
                pixels = None
            _panel(axes, pixels, f"#{example['rank'] + 1}: {example['activation']:.3g}")
        for axes in panels[1 + len(found):]:
            figure.delaxes(axes)
    figure.suptitle(f"{title}\neach unit drawn (left), then the dataset images that excite it most", fontsize=9)
    return figure


def descriptor_depth_figure(atlas: AtlasStore, models: list[str] | None = None, target: str = "mlp") -> Figure | None:
    """Each descriptor against relative depth, a line per (model, weights): median and interquartile range over
    each layer's measured records. None when fewer than 2 layers of the selection have measured records."""
    from pipeline.engine.descriptors import DESCRIPTORS
    from pipeline.models import zoo

    table = atlas.table(columns=["model", "weights", "layer", *DESCRIPTOR_COLUMNS], model=models, target=target)
    by_line: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for row in table.to_pylist():
        if row[DESCRIPTOR_COLUMNS[-1]] is not None:  # a record of a v1 part has no descriptors
            by_line.setdefault((row["model"], row["weights"]), {}).setdefault(row["layer"], []).append(row)
    if len({(line, layer) for line, layers in by_line.items() for layer in layers}) < 2:
        return None
    columns = 3
    lines = math.ceil(len(DESCRIPTOR_COLUMNS) / columns)
    figure = Figure(figsize=(3.4 * columns, 2.6 * lines + 0.6), layout="constrained")
    panels = figure.subplots(lines, columns, squeeze=False).flat
    for axes, name in zip(panels, DESCRIPTOR_COLUMNS):
        for (model, weights), layers in sorted(by_line.items(), key=lambda item: (item[0][0], weights_order(item[0][1]))):
            last = max(1, len(zoo.layout(model).layers) - 1)
            depths = sorted(layers)
            values = [np.array([row[name] for row in layers[layer]], dtype=np.float64) for layer in depths]
            # nan-aware: a flat image's spectral descriptors are NaN (undefined), not a number to average in
            low, median, high = (np.array([np.nanpercentile(v, q) if np.isfinite(v).any() else np.nan
                                           for v in values]) for q in (25, 50, 75))
            x = np.array(depths) / last
            (line,) = axes.plot(x, median, marker="o", markersize=3, label=f"{model} · {short_id(weights)}")
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        unit = DESCRIPTORS[name].unit
        axes.set_title(name, fontsize=8)
        axes.set_ylabel(unit, fontsize=7)
        axes.set_xlabel("relative depth, layer / (L - 1)", fontsize=7)
        axes.set_xlim(-0.03, 1.03)
        axes.tick_params(labelsize=6)
    for axes in list(panels):
        figure.delaxes(axes)
    figure.axes[0].legend(fontsize=6, loc="best")
    figure.suptitle(f"Image descriptors against depth ({target}): median and interquartile range over features",
                    fontsize=9)
    return figure


def write_figures(store_root: str, out: str | Path, models: list[str] | None = None,
                  target: str = "mlp", per_layer: int = 1) -> list[Path]:
    """Render the progression strip and every layer's contact sheet; returns the files written."""
    atlas = open_store(store_root)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"The figures output {str(out)!r} is a file, not a directory. Choose a directory for out=.")
    out.mkdir(parents=True, exist_ok=True)
    written = _save(progression_figure(atlas, models, target, per_layer), out / "progression")
    # The records are read once here, not once a sheet; which units have examples from their rank-0 activations,
    # without the thumbnails, which are read a sheet at a time.
    rows = _best_per_feature(atlas, models, target)
    with_examples = set(atlas.top_natural([row["key"] for row in rows]))
    sheets: dict[tuple, list[dict]] = {}  # (model, weights, layer, source) -> its rows, in _best_per_feature's order
    for row in rows:
        sheets.setdefault((row["model"], row["weights"], row["layer"], row["source"]), []).append(row)
    for (model, weights, layer, source), members in sheets.items():
        title = _sheet_title(model, weights, layer, target, source)
        name = (f"{model_slug(model)}-{model_slug(weights)}-l{layer:03d}"
                + (f"-{model_slug(PurePath(source).stem)}" if source else ""))
        written += _save(_contact_sheet(atlas, members[:MAX_CONTACT_FEATURES], title, source), out / f"contact-{name}")
        shown = _units_shown_with_examples(members, with_examples)
        if shown:
            written += _save(_examples_sheet(atlas, shown, title, source), out / f"examples-{name}")
    depth = descriptor_depth_figure(atlas, models, target)
    if depth is None:
        log.warning("No descriptor-vs-depth figure: the records of %s measured (record schema v2) span fewer than "
                    "2 layers. `vit-atlas describe store.root=%s` measures the records of older stores.",
                    ", ".join(models) if models else "the store", atlas.root)
    else:
        written += _save(depth, out / "descriptors-depth")
    return written


def _save(figure: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.05)  # long row labels stay in the file
    return paths
