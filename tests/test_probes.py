"""Probes on constructed models whose answers are known, and masking that provably hits the right pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.analysis import images as images_lib
from pipeline.errors import PipelineError
from pipeline.models import weights as weights_lib
from pipeline.analysis.probes.run import plan_tasks, run_probes
from pipeline.analysis.probes.base import aggregate
from pipeline.analysis.probes.worker import ProbeWorker
from tests.analysis_fixtures import compose, save_image
from tests.constructed_vit import MODEL, save_constructed

COLOURS = np.eye(3)  # class c: pure colour c
SIZE = 248  # deit_tiny's resize target: the resize is the identity and the crop starts at (12, 12)
OFFSET = 12
PATCH_ROW, PATCH_COL = 3, 5  # crop patch (row-major index 47) that carries the class in the token tests
BOX = (60, 44, 123, 107)  # xmin, ymin, xmax, ymax: crop rows 32..95, cols 48..111 = 4 x 4 patches
PLAIN = "test_convnext"  # a timm classifier outside the zoo (a CNN), 0.3 M parameters


def _dataset(root, paint) -> str:
    """Two images per class; ``paint(array, c)`` writes class c's evidence into a grey (H, W, 3) image."""
    for c in range(3):
        for i in range(2):
            array = np.full((SIZE, SIZE, 3), 0.5)
            paint(array, c)
            save_image(root / f"c{c}" / f"img{c}{i}.png", array)
    return str(root)


def _one_patch(array, c):
    top, left = OFFSET + 16 * PATCH_ROW, OFFSET + 16 * PATCH_COL
    array[top:top + 16, left:left + 16] = COLOURS[c]


def _in_box(array, c):
    xmin, ymin, xmax, ymax = BOX
    array[ymin:ymax + 1, xmin:xmax + 1] = COLOURS[c]


def _checker(array, c):
    rows, cols = np.indices(array.shape[:2])
    array[..., c] += 0.25 * (-1.0) ** (rows + cols)


def _run_direct(tmp_path, probe: str, images: str, weights: str, *overrides: str) -> dict:
    """Plan with the CLI's planner, run every unit in this process, aggregate: {(condition, param, metric): value}."""
    cfg = compose("probes", f"probe.name={probe}", f"probe.models=[{MODEL}]", f"probe.weights={weights}",
                  f"images.path={images}", f"store.root={tmp_path / 'store'}", "device=cpu", *overrides)
    image_set = images_lib.open_images(cfg.images.path, cfg.images.boxes, cfg.images.limit)
    worker = ProbeWorker("cpu", threads=1)
    import pyarrow as pa

    results = pa.concat_tables(worker.run(task) for task in plan_tasks(cfg, image_set))
    return {(r["condition"], r["param"], r["feature"], r["metric"]): r["value"] for r in aggregate(results)}


def test_box_masking_zeroes_exactly_the_box_through_resize_and_crop():
    preprocess = images_lib.Preprocess((224, 224), 248, "bicubic", (0.5,) * 3, (0.5,) * 3)
    box = images_lib.Box(50, 60, 199, 239)
    for height, width in ((300, 400), (120, 100)):  # downsampling and upsampling
        pixels = torch.rand(3, height, width) * 0.8 + 0.1
        inside = images_lib.box_mask(height, width, (box,))
        background = preprocess.crop(pixels * ~inside)
        foreground = preprocess.crop(pixels * inside)
        plain = preprocess.crop(pixels)
        g = preprocess.geometry(height, width)
        # where each crop pixel samples the original, and how far the (antialiased) bicubic kernel reaches
        ys = (torch.arange(224) + g.top + 0.5) / g.scale_y - 0.5
        xs = (torch.arange(224) + g.left + 0.5) / g.scale_x - 0.5
        reach_y, reach_x = 2 / min(g.scale_y, 1) + 1, 2 / min(g.scale_x, 1) + 1
        deep_in = (((ys - reach_y >= box.ymin) & (ys + reach_y <= box.ymax))[:, None]
                   & ((xs - reach_x >= box.xmin) & (xs + reach_x <= box.xmax))[None, :])
        far_out = (((ys + reach_y < box.ymin) | (ys - reach_y > box.ymax))[:, None]
                   | ((xs + reach_x < box.xmin) | (xs - reach_x > box.xmax))[None, :])
        assert deep_in.sum() > 100 and far_out.sum() > 100
        assert torch.all(background[:, deep_in] == 0)
        assert torch.equal(background[:, far_out], plain[:, far_out])
        assert torch.all(foreground[:, far_out] == 0)
        assert torch.equal(foreground[:, deep_in], plain[:, deep_in])
        # the box mapped into the crop frames the zeroed region
        x0, y0, x1, y1 = preprocess.box_in_crop(box, height, width)
        zero_rows = torch.nonzero((background == 0).all(0).any(1)).flatten()
        assert abs(zero_rows.min().item() - y0) <= reach_y + 1 and abs(zero_rows.max().item() + 1 - y1) <= reach_y + 1


def test_box_cover_counts_patch_cells_inside_the_box():
    preprocess = images_lib.Preprocess((224, 224), 248, "bicubic", (0.5,) * 3, (0.5,) * 3)
    cover = preprocess.box_cover((images_lib.Box(*BOX),), SIZE, SIZE, (14, 14)).view(14, 14)
    expected = torch.zeros(14, 14)
    expected[2:6, 3:7] = 1
    assert torch.equal(cover, expected)


def test_tokens_head_reading_a_known_token(tmp_path):
    """Identity blocks: the class sits in patch 47 only, so only that token (or a pooling of all) classifies."""
    images = _dataset(tmp_path / "images", _one_patch)
    weights = save_constructed(tmp_path / "identity.safetensors", evidence="colour")
    values = _run_direct(tmp_path, "tokens", images, weights, "probe.tokens.isolate=[0]", "probe.tokens.drop=[]",
                         "probe.tokens.tokens=[47,0]")
    top1 = {(c, p): v for (c, p, _, m), v in values.items() if m == "top1"}
    assert top1 == {("natural", None): 0.0, ("isolate", 0.0): 0.0, ("patch_mean", None): 1.0,
                    ("patch_max", None): 1.0, ("patch_token", 47.0): 1.0, ("patch_token", 0.0): 0.0}


def test_tokens_probe_on_ray_isolation_and_dropping_and_resume(tmp_path, ray_local, capsys):
    """The last block pools uniformly: CLS sees the class only if it joins the patches in that block."""
    images = _dataset(tmp_path / "images", _one_patch)
    weights = save_constructed(tmp_path / "pool.safetensors", evidence="colour", pool_last=True)
    overrides = [f"probe.models=[{MODEL}]", f"probe.weights={weights}", f"images.path={images}",
                 f"store.root={tmp_path / 'store'}", "probe.tokens.isolate=[0,11,12]", "probe.tokens.drop=[11,12]",
                 "probe.tokens.tokens=[0,random]", "slice_size=3", "progress.bar=false", "cluster.workers=2"]
    cfg = compose("probes", "experiment=probe_tokens", *overrides)
    assert run_probes(cfg) == 0
    out = capsys.readouterr().out
    assert "2 units, 0 done, 2 to run" in out
    report = (tmp_path / "store" / "probes" / "tokens" / "report.md").read_text()  # also printed
    assert report.strip() in out
    assert (tmp_path / "store" / "probes" / "tokens" / "tokens.png").stat().st_size > 1000
    lines = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in report.splitlines()[2:]}
    assert lines == {"natural": "100.00", "isolate 0": "100.00", "isolate 11": "100.00", "isolate 12": "0.00",
                     "drop 11": "0.00", "drop 12": "100.00", "patch_mean": "100.00", "patch_max": "100.00",
                     "patch_token 0": "100.00", "random_token": "100.00"}
    assert run_probes(cfg) == 0
    assert "2 done, 0 to run" in capsys.readouterr().out


def test_frequency_class_signal_only_in_high_frequencies(tmp_path):
    images = _dataset(tmp_path / "images", _checker)
    weights = save_constructed(tmp_path / "checker.safetensors", evidence="checker", pool_last=True)
    values = _run_direct(tmp_path, "frequency", images, weights, "probe.frequency.radii=[8,64]")
    top1 = {(c, p): v for (c, p, _, m), v in values.items() if m == "top1"}
    assert top1[("full", None)] == 1.0
    for radius in (8.0, 64.0):
        assert top1[("lowpass_ideal", radius)] == 0.0
        assert top1[("highpass_ideal", radius)] == 1.0
        assert top1[("highpass_gaussian", radius)] == 1.0
    # a Gaussian low-pass only attenuates: at r=8 the checkerboard keeps exp(-158^2 / 128) of itself, nothing
    assert top1[("lowpass_gaussian", 8.0)] == 0.0


def test_foreground_and_background_with_csv_boxes(tmp_path):
    images = _dataset(tmp_path / "images", _in_box)
    boxes = tmp_path / "boxes.csv"
    rows = [f"img{c}{i},{','.join(map(str, BOX))}" for c in range(3) for i in range(2)]
    boxes.write_text("image_id,xmin,ymin,xmax,ymax\n" + "\n".join(rows) + "\n")
    weights = save_constructed(tmp_path / "pool.safetensors", evidence="colour", pool_last=True)
    values = _run_direct(tmp_path, "fgbg", images, weights, f"images.boxes={boxes}")
    top1 = {c: v for (c, _, _, m), v in values.items() if m == "top1"}
    assert top1 == {"full": 1.0, "foreground": 1.0, "background": 0.0}


def test_spatial_feature_concentrated_on_the_box(tmp_path):
    images = _dataset(tmp_path / "images", _in_box)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("\n".join(f"img{c}{i}.png,{','.join(map(str, BOX))}" for c in range(3) for i in range(2)))
    weights = save_constructed(tmp_path / "unit.safetensors", evidence="colour", spatial_unit=True)
    values = _run_direct(tmp_path, "spatial", images, weights, f"images.boxes={boxes}",
                         "probe.spatial.layers=[0]", "probe.spatial.features=[0,1]")
    # unit 0 fires on class-0 evidence (the red box of class-0 images) and nowhere else
    assert values[("layer", 0.0, 0, "share_in_box")] == pytest.approx(1.0)
    assert values[("layer", 0.0, 0, "entropy")] == pytest.approx(math.log(16) / math.log(196), abs=1e-4)
    assert values[("layer", 0.0, -1, "box_area")] == pytest.approx(16 / 196)
    assert math.isnan(values[("layer", 0.0, 1, "share_in_box")])  # never active: no value, not a zero


def test_bad_probe_inputs_are_reported_before_any_work(tmp_path):
    images = _dataset(tmp_path / "images", _one_patch)
    base = [f"images.path={images}", f"store.root={tmp_path / 'store'}", "probe.weights=random"]
    with pytest.raises(PipelineError, match="has 12 blocks"):
        run_probes(compose("probes", "probe.name=tokens", "probe.tokens.isolate=[13]", *base))
    with pytest.raises(PipelineError, match="head reads the CLS token"):
        run_probes(compose("probes", "probe.name=tokens", "probe.models=[resnet50]", *base))
    with pytest.raises(PipelineError, match="images.boxes"):
        run_probes(compose("probes", "probe.name=fgbg", *base))
    with pytest.raises(PipelineError, match="not a probe"):
        run_probes(compose("probes", "probe.name=colour", *base))
    assert weights_lib.resolve("resnet50", "random", plain_timm=True).weights_id == "random-0"
    with pytest.raises(PipelineError, match="timm knows the architecture 'resnet50' but not the pretrained tag 'x'"):
        run_probes(compose("probes", "probe.name=frequency", "probe.models=[resnet50.x]", *base))
    assert not (tmp_path / "store").exists()


def test_webdataset_tars_and_imagenet_xml_boxes(tmp_path):
    import io
    import tarfile

    from PIL import Image

    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, label in (("n01_1", 3), ("n01_2", 7)):
            buffer = io.BytesIO()
            Image.new("RGB", (20, 10), (255, 0, 0)).save(buffer, format="PNG")
            for name, data in ((f"{key}.png", buffer.getvalue()), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "boxes").mkdir()
    (tmp_path / "boxes" / "n01_2.xml").write_text(
        "<annotation><object><name>n01</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>6</ymax>"
        "</bndbox></object></annotation>")
    image_set = images_lib.open_images(str(tmp_path), str(tmp_path / "boxes"))
    assert [(r.image_id, r.label) for r in image_set.refs] == [("shard-000/n01_1", 3), ("shard-000/n01_2", 7)]
    second = image_set.load(1)
    assert second.pixels.shape == (3, 10, 20) and second.pixels[0].min() == 1.0
    assert second.boxes == (images_lib.Box(1, 2, 5, 6, "n01"),)
    assert image_set.load(0).boxes == ()
    assert image_set.fingerprint() != images_lib.open_images(str(tar_path)).fingerprint()  # boxes count


def test_cli_bad_input_exits_2_with_one_paragraph(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pipeline", "probes", "probe.name=fgbg", "probe.weights=random",
                             f"images.path={tmp_path / 'none'}", f"store.root={tmp_path / 'store'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: Images path") and result.stderr.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_pretrained_weights_missing_offline_stop_the_probe_in_the_driver(tmp_path, monkeypatch, capsys):
    from pipeline.execution import scheduler

    images = _dataset(tmp_path / "images", _one_patch)
    monkeypatch.setattr(scheduler, "run_tasks", lambda *a, **k: pytest.fail("a worker started without weights"))
    cfg = compose("probes", "probe.name=tokens", f"probe.models=[{MODEL}]", "probe.weights=pretrained",
                  f"images.path={images}", f"store.root={tmp_path / 'store'}")
    with pytest.raises(PipelineError, match=rf"Pretrained weights for '{MODEL}' could not be loaded: HF_HUB_OFFLINE"):
        run_probes(cfg)
    assert "results:" not in capsys.readouterr().out


def test_a_checkpoint_with_an_unknown_suffix_is_refused_as_a_sweep_refuses_it(tmp_path, monkeypatch, capsys):
    from pipeline import cli
    from pipeline.execution import scheduler

    images = _dataset(tmp_path / "images", _one_patch)
    checkpoint = tmp_path / "weights.ckpt"
    checkpoint.write_bytes(b"any bytes: the suffix says no known format")
    monkeypatch.setattr(scheduler, "run_tasks", lambda *a, **k: pytest.fail("a worker started with a bad checkpoint"))
    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("a sweep reached Ray"))
    store = f"store.root={tmp_path / 'store'}"
    assert cli.main(["sweep", f"sweep.models=[{MODEL}]", f"model.weights={checkpoint}", store]) == 2
    refused = capsys.readouterr().err
    assert refused.startswith(f"error: Checkpoint '{checkpoint}' has an unknown format") and refused.count("\n") == 1
    for model, probe in ((MODEL, "tokens"), (PLAIN, "frequency")):  # a zoo ViT, and a timm CNN outside the zoo
        assert cli.main(["probes", f"probe.name={probe}", f"probe.models=[{model}]", f"probe.weights={checkpoint}",
                         f"images.path={images}", store]) == 2
        assert capsys.readouterr().err == refused
    assert not (tmp_path / "store").exists()


def test_a_plain_timm_classifiers_checkpoint_changed_after_planning_is_refused_by_the_probe_worker(tmp_path):
    import hashlib

    import timm
    from safetensors.torch import save_file

    from pipeline.models.weights import PlannedFileChanged

    def save_seeded(seed: int) -> None:
        torch.manual_seed(seed)
        save_file(timm.create_model(PLAIN).state_dict(), str(path))

    images = _dataset(tmp_path / "images", _one_patch)
    path = tmp_path / f"{PLAIN}.safetensors"
    save_seeded(0)
    cfg = compose("probes", "probe.name=frequency", f"probe.models=[{PLAIN}]", f"probe.weights={tmp_path}",
                  f"images.path={images}", f"store.root={tmp_path / 'store'}", "device=cpu")
    (task,) = plan_tasks(cfg, images_lib.open_images(str(images)))
    planned = task.weights.weights_id
    save_seeded(1)
    found = f"sha256-{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert found != planned
    with pytest.raises(PlannedFileChanged) as raised:
        ProbeWorker("cpu", threads=1).run(task)
    assert str(raised.value) == (f"the checkpoint at {path} changed since the run was planned: planned {planned}, "
                                 f"found {found}; re-run to plan with the new file")
