"""Paper-style figures from a store, as PNG and PDF.

    python -m pipeline.figures store.root=/data/atlas out=/data/figures [model=a,b] [target=mlp]

- ``progression.{png,pdf}``: the layer-progression strip of the paper's Figure 1:
  one row per (model, weights), one panel per layer from early to late, each the
  layer's most strongly activated visualized feature.
- ``contact-<model>-<weights>-l<layer>.{png,pdf}``: a contact sheet per layer, every
  visualized feature of that layer in feature order (the first MAX_CONTACT_FEATURES).

Where several records share (model, weights, layer, feature) (seeds, configs),
the one with the highest activation is shown. The figure builders return the
matplotlib Figure before anything is saved, so callers can restyle or inspect it.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline import cli
from pipeline.views.atlas import model_slug
from pipeline.errors import PipelineError
from pipeline.views.readers import AtlasStore, open_store

MAX_CONTACT_FEATURES = 64
PANEL_INCHES = 1.3
USAGE = "usage: python -m pipeline.figures store.root=DIR out=DIR [model=NAME[,NAME...]] [target=mlp]"
_SELECT_COLUMNS = ["key", "model", "weights", "layer", "feature", "activation"]


def _best_per_feature(atlas: AtlasStore, models: list[str] | None, target: str) -> list[dict]:
    """One record per (model, weights, layer, feature): the highest activation, ties broken by key."""
    table = atlas.table(columns=_SELECT_COLUMNS, model=models, target=target)
    if not table.num_rows:
        scope = f"models {', '.join(models)}" if models else "any model"
        raise PipelineError(
            f"The store at {atlas.root!r} has no records of target {target!r} for {scope}. Check the model "
            "names and target against the store (`pipeline.readers.open_store(root).frame()` lists them)."
        )
    best: dict[tuple, dict] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (-r["activation"], r["key"])):
        best.setdefault((row["model"], row["weights"], row["layer"], row["feature"]), row)
    return sorted(best.values(), key=lambda r: (r["model"], r["weights"], r["layer"], r["feature"]))


def _images(atlas: AtlasStore, rows: list[dict]) -> dict[str, np.ndarray]:
    models = sorted({row["model"] for row in rows})
    images = {}
    for batch in atlas.keyed_batches([row["key"] for row in rows], columns=["key", "png"], model=models):
        for key, png in zip(batch.column("key").to_pylist(), batch.column("png").to_pylist()):
            images[key] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return images


def _panel(axes, image: np.ndarray, title: str) -> None:
    axes.imshow(image, interpolation="nearest")
    axes.set_title(title, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def progression_figure(atlas: AtlasStore, models: list[str] | None = None, target: str = "mlp") -> Figure:
    """One row per (model, weights), one panel per visualized layer, early (left) to late (right)."""
    rows = _best_per_feature(atlas, models, target)
    strongest: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: (-r["activation"], r["key"])):
        strongest.setdefault((row["model"], row["weights"], row["layer"]), row)
    strips: dict[tuple, list[dict]] = {}
    for (model, weights, _layer), row in sorted(strongest.items()):
        strips.setdefault((model, weights), []).append(row)
    columns = max(len(strip) for strip in strips.values())
    images = _images(atlas, list(strongest.values()))

    figure = Figure(figsize=(PANEL_INCHES * columns + 1.5, (PANEL_INCHES + 0.3) * len(strips)),
                    layout="constrained")
    grid = figure.subplots(len(strips), columns, squeeze=False)
    for axes_row, ((model, weights), strip) in zip(grid, strips.items()):
        for position, axes in enumerate(axes_row):
            if position >= len(strip):
                figure.delaxes(axes)
                continue
            row = strip[position]
            _panel(axes, images[row["key"]], f"layer {row['layer']} · f{row['feature']}")
        axes_row[0].set_ylabel(f"{model}\n{weights}", fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(f"Feature progression, early → late layers ({target})", fontsize=9)
    return figure


def contact_sheet_figure(atlas: AtlasStore, model: str, weights: str, layer: int, target: str = "mlp") -> Figure:
    """Every visualized feature of one layer (the first MAX_CONTACT_FEATURES), in feature order."""
    rows = [row for row in _best_per_feature(atlas, [model], target)
            if row["weights"] == weights and row["layer"] == layer][:MAX_CONTACT_FEATURES]
    if not rows:
        raise PipelineError(
            f"The store at {atlas.root!r} has no {target} records of {model!r} with weights {weights!r} at "
            f"layer {layer}; pick a layer the store holds."
        )
    images = _images(atlas, rows)
    columns = math.ceil(math.sqrt(len(rows)))
    lines = math.ceil(len(rows) / columns)
    figure = Figure(figsize=(PANEL_INCHES * columns, (PANEL_INCHES + 0.2) * lines + 0.4), layout="constrained")
    for position, axes in enumerate(figure.subplots(lines, columns, squeeze=False).flat):
        if position >= len(rows):
            figure.delaxes(axes)
            continue
        _panel(axes, images[rows[position]["key"]], f"feature {rows[position]['feature']}")
    figure.suptitle(f"{model} · {weights} · layer {layer} ({target})", fontsize=9)
    return figure


def write_figures(store_root: str, out: str | Path, models: list[str] | None = None,
                  target: str = "mlp") -> list[Path]:
    """Render the progression strip and every layer's contact sheet; returns the files written."""
    atlas = open_store(store_root)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"The figures output {str(out)!r} is a file, not a directory. Choose a directory for out=.")
    out.mkdir(parents=True, exist_ok=True)
    written = _save(progression_figure(atlas, models, target), out / "progression")
    sheets = sorted({(r["model"], r["weights"], r["layer"]) for r in _best_per_feature(atlas, models, target)})
    for model, weights, layer in sheets:
        name = f"contact-{model_slug(model)}-{model_slug(weights)}-l{layer:03d}"
        written += _save(contact_sheet_figure(atlas, model, weights, layer, target), out / name)
    return written


def _save(figure: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        figure.savefig(path, dpi=150)
    return paths
