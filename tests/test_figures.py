"""Paper figures: the layer-progression strip and per-layer contact sheets, as PNG and PDF."""

from __future__ import annotations

import logging

import pytest

from pipeline.errors import PipelineError
from pipeline.cli import main
from pipeline.store.errors import repair_command
from pipeline.views.figures import (RANDOM_CAPTION, contact_sheet_figure, descriptor_depth_figure, progression_figure,
                                    write_figures)
from pipeline.views.readers import open_store
from synthetic_store import CLIP, DEIT, records, write_raw_store, write_v1_store


def test_progression_has_one_row_per_model_and_weights_and_a_panel_per_layer(synthetic_store_root):
    atlas = open_store(str(synthetic_store_root))
    figure = progression_figure(atlas)
    # Rows: deit planted (layer 1), deit random (layers 0-3), clip (layers 0-1); empty cells are removed.
    assert len(figure.axes) == 1 + 4 + 2
    assert [axes.get_title() for axes in figure.axes] == (  # each layer's most activated feature, early -> late
        ["layer 1 · f1"] + [f"layer {layer} · f3" for layer in range(4)] + ["layer 0 · f2", "layer 1 · f2"])
    assert [axes.get_ylabel() for axes in figure.axes if axes.get_ylabel()] == [
        f"{DEIT}\nplanted-v1-0", f"{DEIT}\nrandom-0", f"{CLIP}\npretrained-openai"]
    assert [axes.get_title() for axes in progression_figure(atlas, models=[CLIP]).axes] == [
        "layer 0 · f2", "layer 1 · f2"]


def test_progression_per_layer_stacks_each_layers_strongest_features_in_rank_order(synthetic_store_root):
    atlas = open_store(str(synthetic_store_root))
    figure = progression_figure(atlas, models=[DEIT], per_layer=2)
    frame = atlas.frame(model=DEIT)
    expected = {}
    for (weights, layer), group in frame.groupby(["weights", "layer"]):
        ranked = group.sort_values(["activation", "key"], ascending=[False, True])["feature"].tolist()
        expected.update({(weights, rank, layer): feature for rank, feature in enumerate(ranked[:2])})
    rows = [(w, rank) for w in ("planted-v1-0", "random-0") for rank in range(2)
            if any((w, rank, layer) in expected for layer in range(4))]
    shown = {}
    for axes in figure.axes:
        spec = axes.get_subplotspec()
        layer, feature = (int(part.split()[-1].lstrip("f")) for part in axes.get_title().split(" · "))
        assert spec.colspan.start == layer
        shown[(*rows[spec.rowspan.start], layer)] = feature
    assert shown == expected and len(rows) == 4  # planted: 2 features of layer 1; random: 2 of each layer
    assert [axes.get_ylabel() for axes in figure.axes if axes.get_ylabel()] == [f"{DEIT}\nplanted-v1-0",
                                                                                f"{DEIT}\nrandom-0"]


def test_progression_columns_are_layers_with_headers_and_empty_cells_where_a_row_has_none(synthetic_store_root):
    figure = progression_figure(open_store(str(synthetic_store_root)))
    cells = {}
    for axes in figure.axes:
        spec = axes.get_subplotspec()
        cells[(spec.rowspan.start, spec.colspan.start)] = axes.get_title().split(" · ")[0]
    # rows: deit planted (layer 1 only), deit random (0-3), clip (0-1); columns: layers 0-3
    assert cells == {(0, 1): "layer 1",
                     (1, 0): "layer 0", (1, 1): "layer 1", (1, 2): "layer 2", (1, 3): "layer 3",
                     (2, 0): "layer 0", (2, 1): "layer 1"}
    empty = {(row, column) for row in range(3) for column in range(4)} - set(cells)
    assert empty == {(0, 0), (0, 2), (0, 3), (2, 2), (2, 3)}
    # a header per column, centred over the column's panels
    headers = {text.get_text(): text for text in figure.texts if text.get_text().startswith("layer ")}
    assert sorted(headers) == [f"layer {layer}" for layer in range(4)]
    for axes in figure.axes:
        box = axes.get_position()
        header = headers[axes.get_title().split(" · ")[0]]
        assert header.get_position()[0] == pytest.approx((box.x0 + box.x1) / 2)
        assert header.get_position()[1] > box.y1
    # random weights say what they are, beside their own row
    captions = [text for text in figure.texts if text.get_text() == RANDOM_CAPTION]
    assert len(captions) == 1
    random_row = [axes.get_position() for axes in figure.axes if axes.get_subplotspec().rowspan.start == 1]
    assert random_row[0].y0 < captions[0].get_position()[1] < random_row[0].y1


def test_figures_draw_a_placeholder_for_an_image_that_does_not_decode(tmp_path, caplog):
    made = [r for r in records() if r["weights"] == "random-0"]
    broken = next(r for r in made if (r["layer"], r["feature"]) == (2, 3))  # layer 2's strongest feature
    broken["png"] = b"\x89PNG\r\n\x1a\n but then nothing"
    write_raw_store(tmp_path / "store", made)
    atlas = open_store(str(tmp_path / "store"))
    with caplog.at_level(logging.WARNING, logger="pipeline.views.figures"):
        figure = progression_figure(atlas)
    assert [axes.get_title() for axes in figure.axes] == [f"layer {layer} · f3" for layer in range(4)]
    assert [len(axes.images) for axes in figure.axes] == [1, 1, 0, 1]  # the placeholder draws no image
    assert any(text.get_text().startswith("image does") for text in figure.axes[2].texts)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert repr(broken["key"]) in message and "does not decode" in message and repair_command(atlas.root) in message
    assert "re-run the sweep" in message

    written = write_figures(str(tmp_path / "store"), tmp_path / "figures")
    assert len(written) == 2 * 6 and all(path.stat().st_size > 0 for path in written)  # strip, 4 sheets, depth


def test_contact_sheet_shows_every_feature_of_a_layer(synthetic_store_root):
    atlas = open_store(str(synthetic_store_root))
    sheet = contact_sheet_figure(atlas, DEIT, "random-0", 2)
    assert [axes.get_title() for axes in sheet.axes] == [f"feature {f}" for f in range(4)]
    assert len(contact_sheet_figure(atlas, CLIP, "pretrained-openai", 0).axes) == 3
    with pytest.raises(PipelineError, match="at layer 7"):
        contact_sheet_figure(atlas, DEIT, "random-0", 7)


def test_cli_writes_png_and_pdf_per_figure(synthetic_store_root, tmp_path, capsys):
    def figures(*args):  # in-process: `vit-atlas figures ARGS` is main() with sys.argv
        return main(["figures", *args]), capsys.readouterr()

    status, output = figures(f"store.root={synthetic_store_root}", f"out={tmp_path}", f"models=[{CLIP}]")
    assert status == 0, output.err
    assert output.out.startswith("figures: wrote 8 files (4 figures, PNG and PDF)")
    stems = {path.stem for path in tmp_path.iterdir()}
    assert len(stems) == 4 and {"progression", "descriptors-depth"} <= stems  # and CLIP's two layers' sheets
    for stem in stems:
        assert (tmp_path / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / f"{stem}.pdf").read_bytes().startswith(b"%PDF")

    status, output = figures(f"store.root={synthetic_store_root}", f"out={tmp_path}", "models=[resnet50]")
    assert status == 2 and "no records of target 'mlp' for models resnet50" in output.err
    status, output = figures(f"store.root={synthetic_store_root}", "colour=red")
    assert status == 2 and output.err.startswith("error: Unknown setting 'colour'") and output.err.count("\n") == 1


def test_descriptor_depth_overlays_each_models_median_and_spread_at_relative_depth(synthetic_store_root):
    import numpy as np

    from pipeline.engine.descriptors import DESCRIPTORS

    atlas = open_store(str(synthetic_store_root))
    figure = descriptor_depth_figure(atlas)
    assert [axes.get_title() for axes in figure.axes] == list(DESCRIPTORS)
    panel = figure.axes[list(DESCRIPTORS).index("png_bytes")]
    lines = {line.get_label(): line for line in panel.get_lines()}
    assert sorted(lines) == [f"{DEIT} · planted-v1-0", f"{DEIT} · random-0", f"{CLIP} · pretrained-openai"]
    random = lines[f"{DEIT} · random-0"]
    assert list(random.get_xdata()) == pytest.approx([0, 1 / 11, 2 / 11, 3 / 11])  # layers 0-3 of 12
    assert list(lines[f"{CLIP} · pretrained-openai"].get_xdata()) == pytest.approx([0, 1 / 11])
    frame = atlas.frame(columns=["weights", "layer", "png_bytes"], model=DEIT)
    medians = frame[frame.weights == "random-0"].groupby("layer").png_bytes.median().to_numpy()
    assert np.allclose(random.get_ydata(), medians)
    assert len(panel.collections) == 3  # an interquartile band per line


def test_no_descriptor_depth_figure_for_a_store_without_measurements(tmp_path, caplog):
    write_v1_store(tmp_path / "store")
    assert descriptor_depth_figure(open_store(str(tmp_path / "store"))) is None
    with caplog.at_level(logging.WARNING):
        written = write_figures(str(tmp_path / "store"), tmp_path / "out", [CLIP])
    assert "descriptors-depth" not in {path.stem for path in written} and "vit-atlas describe" in caplog.text


def test_directions_get_their_own_sheets_and_an_examples_figure_sets_each_unit_beside_its_top_images(tmp_path):
    import json

    from pipeline.store.store import Store
    from pipeline.views.figures import examples_figure
    from synthetic_store import write_examples

    layer_two = ((DEIT, "deit", "random-0", [2], range(2), {}),)
    channels = records(layer_two)
    rows = records(layer_two, config_hash="cfgD")  # rows 0 and 1 of a PCA: the same (layer, feature) numbers
    for row in rows:
        row["config"] = json.dumps({"objective": "mean", "directions": {"path": "/data/dino-l02-pca-n4.npy",
                                                                         "sha256": "ab" * 32, "format": "npy"}})
        row["activation"] += 10  # stronger than the channels: mixed in, they would take the channels' place
    with Store(str(tmp_path / "store")).writer(commit_every=10) as writer:
        for record in channels + rows:
            writer.add(record)
    write_examples(tmp_path / "store", [rows[1]["key"]], per_key=3)
    atlas = open_store(str(tmp_path / "store"))

    assert [axes.get_title() for axes in contact_sheet_figure(atlas, DEIT, "random-0", 2).axes] == [
        "feature 0", "feature 1"]
    sheet = contact_sheet_figure(atlas, DEIT, "random-0", 2, source="dino-l02-pca-n4.npy")
    assert [axes.get_title() for axes in sheet.axes] == ["direction 0", "direction 1"]
    assert "directions of dino-l02-pca-n4.npy" in sheet.texts[0].get_text()

    figure = examples_figure(atlas, DEIT, "random-0", 2, source="dino-l02-pca-n4.npy")
    unit = rows[1]  # direction 1 alone has examples: one row, its image and its 3 examples
    assert [axes.get_title() for axes in figure.axes] == [
        f"drawn: {unit['activation']:.3g}\nnoise {unit['activation_noise']:.3g} · grey {unit['activation_grey']:.3g}",
        "#1: 3", "#2: 2", "#3: 1"]
    assert figure.axes[0].get_ylabel() == "direction 1"
    with pytest.raises(PipelineError, match="no dataset examples for layer 2"):
        examples_figure(atlas, DEIT, "random-0", 2)  # the channels have none

    stems = {path.stem for path in write_figures(str(tmp_path / "store"), tmp_path / "figures")}
    assert stems == {"progression", f"contact-{DEIT}-random-0-l002", f"contact-{DEIT}-random-0-l002-dino-l02-pca-n4",
                     f"examples-{DEIT}-random-0-l002-dino-l02-pca-n4"}
    labels = [axes.get_ylabel() for axes in progression_figure(atlas).axes if axes.get_ylabel()]
    assert labels == [f"{DEIT}\nrandom-0", f"{DEIT}\nrandom-0\ndirections dino-l02-pca-n4.npy"]
