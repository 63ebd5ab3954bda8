"""Paper figures: the layer-progression strip and per-layer contact sheets, as PNG and PDF."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.figures import main
from pipeline.views.figures import contact_sheet_figure, progression_figure
from pipeline.views.readers import open_store
from synthetic_store import CLIP, DEIT


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


def test_contact_sheet_shows_every_feature_of_a_layer(synthetic_store_root):
    atlas = open_store(str(synthetic_store_root))
    sheet = contact_sheet_figure(atlas, DEIT, "random-0", 2)
    assert [axes.get_title() for axes in sheet.axes] == [f"feature {f}" for f in range(4)]
    assert len(contact_sheet_figure(atlas, CLIP, "pretrained-openai", 0).axes) == 3
    with pytest.raises(PipelineError, match="at layer 7"):
        contact_sheet_figure(atlas, DEIT, "random-0", 7)


def test_cli_writes_png_and_pdf_per_figure(synthetic_store_root, tmp_path, capsys):
    def figures(*args):  # in-process: `python -m pipeline.figures` is main() with sys.argv
        return main(list(args)), capsys.readouterr()

    status, output = figures(f"store.root={synthetic_store_root}", f"out={tmp_path}", f"models=[{CLIP}]")
    assert status == 0, output.err
    assert output.out.startswith("figures: wrote 6 files (3 figures, PNG and PDF)")
    stems = {path.stem for path in tmp_path.iterdir()}
    assert len(stems) == 3 and "progression" in stems  # the strip and CLIP's two layers
    for stem in stems:
        assert (tmp_path / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / f"{stem}.pdf").read_bytes().startswith(b"%PDF")

    status, output = figures(f"store.root={synthetic_store_root}", f"out={tmp_path}", "models=[resnet50]")
    assert status == 2 and "no records of target 'mlp' for models resnet50" in output.err
    status, output = figures(f"store.root={synthetic_store_root}", "colour=red")
    assert status == 2 and output.err.startswith("error: Unknown setting 'colour'") and output.err.count("\n") == 1
