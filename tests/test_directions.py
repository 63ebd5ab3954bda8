"""`vit-atlas directions`: PCA against a direct SVD, a top-k SAE that learns and the files the sweep reads,
resuming after kill -9, and bad input refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipeline import cli
from pipeline.analysis import dictionary
from pipeline.analysis import images as images_lib
from pipeline.engine import measures
from pipeline.engine.activations import ActivationReader
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from tests.analysis_fixtures import save_image

MODEL = "deit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[1]
# One thread: these models and fits are tiny, and on a busy machine more threads spin instead of working.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_images(root: Path, count: int, side: int = 64) -> Path:
    """Smooth random colour fields in two classes: structure enough for a spectrum of components."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.random((4, 4, 3))
        field = np.kron(coarse, np.ones((side // 4, side // 4, 1))) + 0.05 * rng.standard_normal((side, side, 3))
        save_image(root / f"c{i % 2}" / f"{i:03d}.png", field)
    return root


def direct_tokens(images: Path, layer: int) -> torch.Tensor:
    """Every patch token's MLP activation at ``layer``, from the untruncated forward of the random model."""
    choice = weights_lib.resolve(MODEL, "random")
    model = weights_lib.load(MODEL, choice)
    layout = zoo.layout(MODEL)
    reader = ActivationReader(model, layout)
    preprocess = images_lib.Preprocess.for_model(model)
    pixels = [image.pixels for image in images_lib.open_images(str(images)).images()]
    with torch.no_grad():
        tokens = reader(preprocess.normalize(torch.stack([preprocess.crop(p) for p in pixels])), layer,
                        truncate=False)
    return tokens.reshape(-1, tokens.shape[-1]).double()


def content_free_scores(encoder: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit of ``encoder`` at layer 1 on flat grey and on uniform noise (the mean over four images),
    scored as the sweep's baselines are: the unit of the patch tokens' mean, from the untruncated forward."""
    choice = weights_lib.resolve(MODEL, "random")
    model = weights_lib.load(MODEL, choice)
    reader = ActivationReader(model, zoo.layout(MODEL))
    preprocess = images_lib.Preprocess.for_model(model)
    images = torch.cat([torch.full((1, 3, 224, 224), measures.GREY_LEVEL),
                        torch.stack([measures.noise_image(seed, (224, 224)) for seed in range(4)])])
    with torch.no_grad():
        pooled = reader(preprocess.normalize(images), 1, truncate=False).double().mean(1)
    units = (pooled - encoder["b_dec"]) @ encoder["W_enc"] + encoder["b_enc"]
    return units[0], units[1:].mean(0)


def run(capsys, *overrides: str) -> tuple[int, str, str]:
    code = cli.main(["directions", f"model.name={MODEL}", "model.weights=random", "device=cpu", *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def printed_path(out: str) -> Path:
    return Path(out.rpartition("target.directions=")[2].strip())


def test_pca_explains_the_variance_a_direct_svd_finds_and_a_rerun_does_nothing(tmp_path, capsys):
    images = make_images(tmp_path / "images", 6)
    args = [f"images.path={images}", f"store.root={tmp_path / 'store'}", "layer=1", "n=8", "slice_size=4"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    path = printed_path(out)
    assert path.suffix == ".safetensors" and path.parent == tmp_path / "store" / "directions"
    with safe_open(str(path), "pt") as f:
        encoder = {name: f.get_tensor(name).double() for name in f.keys()}
    assert {name: tuple(t.shape) for name, t in encoder.items()} == {
        "W_enc": (768, 8), "b_enc": (8,), "W_dec": (8, 768), "b_dec": (768,)}
    components = encoder["W_dec"]
    torch.testing.assert_close(encoder["W_enc"], components.T)
    torch.testing.assert_close(components.norm(dim=1), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)

    tokens = direct_tokens(images, 1)
    centred = tokens - tokens.mean(0)
    singular, vectors = torch.linalg.svd(centred, full_matrices=False)[1:]
    ratios = (singular**2 / (singular**2).sum())[:8]
    provenance = json.loads(path.with_suffix(".json").read_text())
    np.testing.assert_allclose(provenance["fit"]["explained_variance_ratio"], ratios.numpy(), rtol=1e-3, atol=1e-5)
    assert provenance["fit"]["explained_variance"] == pytest.approx(float(ratios.sum()), rel=1e-4)
    # The same directions up to sign (the leading ones, whose variances are well apart) ...
    overlap = (vectors[:4] * components[:4]).sum(1)
    torch.testing.assert_close(overlap.abs(), torch.ones(4, dtype=torch.float64), atol=1e-3, rtol=0)
    # ... and a unit is a component's score, the centred token's projection, turned away from the content-free
    # images: of flat grey's and uniform noise's scores, as the sweep's baselines pool them, the larger is as
    # low as a sign can make it (their sum below 0), and the provenance gives both.
    torch.testing.assert_close(encoder["b_dec"], tokens.mean(0), atol=1e-4, rtol=1e-4)
    units = (tokens - encoder["b_dec"]) @ encoder["W_enc"] + encoder["b_enc"]
    torch.testing.assert_close(units[:, :4], centred @ vectors[:4].T * overlap.sign(), atol=1e-3, rtol=1e-3)
    assert (units.mean(0).abs() < 1e-3 * units.std(0)).all()
    grey, noise = content_free_scores(encoder)
    assert (grey + noise < 0).all()
    scores = provenance["fit"]["reference_scores"]
    np.testing.assert_allclose(scores["flat_grey"], grey.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(scores["uniform_noise"], noise.numpy(), rtol=1e-3, atol=1e-4)
    assert sorted(provenance["references"]) == ["flat grey"] + [f"uniform noise {seed}" for seed in range(4)]
    assert provenance["images"]["tokens"] == tokens.shape[0] == 6 * 196
    assert len(provenance["images"]["per_image"]) == 6
    assert provenance["weights"] == "random-0" and provenance["layer"] == 1 and provenance["target"] == "mlp"
    assert "6 images in 2 slice(s), 0 gathered, 2 to read" in err

    modified = path.stat().st_mtime_ns
    code, out, err = run(capsys, *args)
    assert code == 0 and "already fitted; nothing to do" in out and printed_path(out) == path
    assert path.stat().st_mtime_ns == modified

    # Tokens gathered before the content-free references were (a store of an older version): another fit reads
    # only the references, and turns its components as the first fit did.
    (next((tmp_path / "store" / "directions").glob("tokens-*")) / "part-references.parquet").unlink()
    code, out, err = run(capsys, *args[:-2], "n=6", "slice_size=4")
    assert code == 0 and "2 gathered, 0 to read" in err and "references gathered" in err
    with safe_open(str(printed_path(out)), "pt") as f:
        torch.testing.assert_close(f.get_tensor("W_enc").double()[:, :4], encoder["W_enc"][:, :4], atol=1e-4, rtol=0)

    code, out, err = run(capsys, *args, "tokens_per_image=50")  # other activations: gathered anew
    assert code == 0 and "6 images in 2 slice(s), 0 gathered, 2 to read" in err
    assert json.loads(printed_path(out).with_suffix(".json").read_text())["images"]["tokens"] == 6 * 50


def test_topk_sae_reconstructs_better_as_it_trains():
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(48, 16, generator=generator), dim=1)
    codes = torch.rand(4000, 48, generator=generator) * (torch.rand(4000, 48, generator=generator) < 0.08)
    fit = dictionary.train_topk_sae(codes @ atoms + 3.0, latents=48, k=6, steps=400, batch_size=256, lr=3e-3, seed=0)
    first, last = fit.fvu_curve[0][1], fit.fvu_curve[-1][1]
    assert last < 0.5 * first and fit.fvu < 0.3
    assert torch.allclose(fit.sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)


def test_topk_sae_writes_the_safetensors_the_sweep_reads(tmp_path, capsys):
    images = make_images(tmp_path / "images", 4)
    code, out, err = run(capsys, f"images.path={images}", f"store.root={tmp_path / 'store'}", "layer=0",
                         "method=topk_sae", "n=96", "sae.k=8", "sae.steps=60", "sae.batch_size=128")
    assert code == 0, err
    path = printed_path(out)
    assert path.suffix == ".safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        embedded = json.loads(f.metadata()["vit-atlas"])
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "W_enc": (768, 96), "b_enc": (96,), "W_dec": (96, 768), "b_dec": (768,)}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    provenance = json.loads(path.with_suffix(".json").read_text())
    assert embedded == provenance and provenance["method"] == "topk_sae" and provenance["fit"]["k"] == 8
    # The files' latents reconstruct the model's own activations as well as the fit said.
    tokens = direct_tokens(images, 0).float()
    sae = dictionary.TopKSAE(768, 96, 8)
    sae.load_state_dict(tensors)
    fvu, _ = dictionary.measure(sae, tokens, tokens.mean(0))
    assert fvu == pytest.approx(provenance["fit"]["fvu"], rel=1e-3)
    assert fvu < 1


def _parts(root: Path, table: str) -> int:
    return len(list((root / "directions").glob(f"{table}/part-*.parquet")))


def _kill_when(command: list[str], cwd: Path, ready) -> None:
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the job finished before it could be killed; give it more work"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()


def test_killed_while_gathering_then_while_fitting_it_resumes_each_time(tmp_path, capsys):
    images = make_images(tmp_path / "images", 40, side=32)
    root = tmp_path / "store"
    args = [f"model.name={MODEL}", "model.weights=random", "device=cpu", f"images.path={images}",
            f"store.root={root}", "layer=0", "slice_size=1", "batch_size=1", "method=topk_sae", "n=32", "sae.k=4",
            "sae.steps=1500", "sae.batch_size=256"]
    command = [sys.executable, "-m", "pipeline", "directions", *args]
    _kill_when(command, tmp_path, lambda: _parts(root, "tokens-*") >= 1)
    gathered = _parts(root, "tokens-*")
    assert 0 < gathered < 40
    _kill_when(command, tmp_path, lambda: _parts(root, "tokens-*") == 41)  # the slices and references: it fits
    assert _parts(root, "fits") == 0

    assert cli.main(["directions", *args]) == 0
    out, err = capsys.readouterr()
    assert "40 images in 40 slice(s), 40 gathered, 0 to read" in err
    assert _parts(root, "fits") == 1 and printed_path(out).is_file()
    provenance = json.loads(printed_path(out).with_suffix(".json").read_text())
    assert sorted(provenance["images"]["per_image"]) == sorted(
        ref.image_id for ref in images_lib.open_images(str(images)).refs)
    assert provenance["images"]["tokens"] == 40 * 196


@pytest.mark.parametrize("override,says", [
    ("method=kmeans", "method='kmeans' is not a dictionary method"),
    ("n=769", "n=769 is more principal components than the 768 features"),
    ("layer=12", "Layer 12 is out of range"),
    ("model.name=deit_tinny_patch16_224", "Unknown model 'deit_tinny_patch16_224'"),
    ("target.kind=logits", "Unknown target 'logits'"),
    ("images.path=MISSING", "is not a directory"),
    ("method=topk_sae n=8 sae.k=9", "sae.k=9 is larger than n=8"),
])
def test_bad_input_is_one_paragraph_and_exit_2_with_nothing_written(tmp_path, capsys, override, says):
    images = make_images(tmp_path / "images", 2)
    overrides = [o.replace("MISSING", str(tmp_path / "missing")) for o in override.split()]
    code, out, err = run(capsys, f"images.path={images}", f"store.root={tmp_path / 'store'}", "layer=1", *overrides)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "store").exists()
