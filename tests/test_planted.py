"""Planted weights: the units prefer what they were built to prefer, also under the
optimizer's augmentations, and a plain gradient ascent recovers it from noise."""

import math

import pytest
import torch

import pipeline  # noqa: F401  (installs the torchvision shim before timm is imported)
import timm
from pipeline.models import planted
from pipeline.errors import PipelineError

MODEL = "deit_tiny_patch16_224"
SIZE = 224
PHASES = [k * 2 * math.pi / 8 for k in range(8)]


class _Stop(Exception):
    """Raised by the hook to end the forward pass after the planted block's GELU."""


class Truncated:
    """The planted model run only up to ``blocks[layer].mlp.act``; returns patch-mean activations."""

    def __init__(self, model_name: str, layer: int):
        self.model = timm.create_model(model_name)
        self.model.load_state_dict(planted.planted_state_dict(model_name), strict=True)
        self.model.eval().requires_grad_(False)
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        self.prefix = self.model.num_prefix_tokens
        self.model.blocks[layer].mlp.act.register_forward_hook(self._stop)

    def _stop(self, module, inputs, output):
        self.output = output
        raise _Stop

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] (or augmented) -> (B, hidden) patch-mean activations."""
        try:
            self.model((images - self.mean) / self.std)
        except _Stop:
            pass
        return self.output[:, self.prefix:].mean(dim=1)


@pytest.fixture(scope="module")
def units():
    return planted.planted_units(MODEL)


@pytest.fixture(scope="module")
def net(units):
    return Truncated(MODEL, units[0].layer)


def augmentation(n: int, generator: torch.Generator):
    """One draw of the optimizer's augmentations for n images: per image and channel
    (x - mu) / sigma plus an N(0, 0.5^2) offset, then one circular shift of up to 32 px.
    With n=1 every image in a batch gets the same draw."""
    mu = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    sigma = torch.exp(torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    noise = torch.randn(n, 3, 1, 1, generator=generator) * 0.5
    dy, dx = torch.randint(-32, 33, (2,), generator=generator).tolist()
    return lambda images: torch.roll((images - mu) / sigma + noise, (dy, dx), (2, 3))


def dominant_orientation(image: torch.Tensor) -> tuple[float, float]:
    """(angle in degrees in [0, 180), period in px) of the strongest Fourier component
    of the grey image, in the planted convention (0° = vertical stripes, counter-clockwise)."""
    grey = image.mean(dim=0)
    spectrum = torch.fft.rfft2(grey - grey.mean()).abs()
    ky, kx = divmod(int(spectrum.argmax()), spectrum.shape[1])
    ky = ky - grey.shape[0] if ky > grey.shape[0] // 2 else ky
    return math.degrees(math.atan2(-ky, kx)) % 180, grey.shape[0] / math.hypot(kx, ky)


def angle_error(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


def test_state_dict_loads_strictly_and_keeps_seeded_init_elsewhere(units):
    sd = planted.planted_state_dict(MODEL, seed=3)
    timm.create_model(MODEL).load_state_dict(sd, strict=True)
    torch.manual_seed(3)
    reference = timm.create_model(MODEL, pretrained=False).state_dict()
    fc1 = f"blocks.{units[0].layer}.mlp.fc1.weight"
    planted_rows = torch.zeros(sd[fc1].shape[0], dtype=torch.bool)
    planted_rows[[u.feature for u in units]] = True
    assert torch.equal(sd[fc1][~planted_rows], reference[fc1][~planted_rows]), "unplanted units keep timm's init"
    assert not torch.equal(sd[fc1][planted_rows], reference[fc1][planted_rows])
    assert torch.equal(sd["blocks.5.attn.qkv.weight"], reference["blocks.5.attn.qkv.weight"])
    other_seed = planted.planted_state_dict(MODEL, seed=4)[fc1]
    assert not torch.equal(sd[fc1][~planted_rows], other_seed[~planted_rows])
    assert torch.equal(sd[fc1][planted_rows], other_seed[planted_rows]), "the planted units do not depend on the seed"


def test_planted_units_cover_colours_and_orientations(units):
    labels = {u.label for u in units}
    assert {"red", "green", "blue"} <= labels
    assert {f"grating {a}°" for a in (0, 45, 90, 135)} <= labels
    assert len({(u.layer, u.feature) for u in units}) == len(units)
    assert planted.PLANTED_VERSION


def test_unsupported_model_says_which_are(units):
    with pytest.raises(PipelineError, match="deit_tiny_patch16_224"):
        planted.planted_state_dict("resnet18")
    with pytest.raises(PipelineError, match="deit_tiny_patch16_224"):
        planted.planted_units("no_such_model_anywhere")


def assert_each_unit_prefers_its_own_stimulus(units, net, size):
    """Every planted stimulus (gratings at 4 phases) through the net; each unit's own
    stimulus must beat every other one by a clear margin."""
    stimuli = [(u.label, planted.stimulus(u.label, size, phase)) for u in units
               for phase in (PHASES[::2] if u.label.startswith("grating") else [0.0])]
    with torch.no_grad():
        acts = net(torch.stack([image for _, image in stimuli]))
    for u in units:
        own = torch.tensor([label == u.label for label, _ in stimuli])
        response = acts[:, u.feature]
        assert response[own].min() > response[~own].max() + 0.5, (u.label, response)


def test_each_unit_prefers_its_own_stimulus(units, net):
    assert_each_unit_prefers_its_own_stimulus(units, net, SIZE)


def test_construction_carries_over_to_other_vits():
    name = "vit_small_patch32_224"  # another width, patch size and input normalization
    units = planted.planted_units(name)
    assert_each_unit_prefers_its_own_stimulus(units, Truncated(name, units[0].layer), SIZE)


def test_grating_units_are_phase_invariant(units, net):
    for u in units:
        if not u.label.startswith("grating"):
            continue
        with torch.no_grad():
            response = net(torch.stack([planted.stimulus(u.label, SIZE, p) for p in PHASES]))[:, u.feature]
        assert (response.max() - response.min()) / response.mean() < 0.05, (u.label, response)


def test_expected_activation_under_augmentation_ranks_own_stimulus_first(units, net):
    # The same 32 draws for every stimulus, so the comparison is not drowned in sampling noise.
    images = torch.stack([planted.stimulus(u.label, SIZE) for u in units])
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(len(units), len(units))  # [stimulus, unit]
    with torch.no_grad():
        for _ in range(32):
            total += net(augmentation(1, generator)(images))[:, [u.feature for u in units]]
    expected = total / 32
    for i, u in enumerate(units):
        others = torch.cat([expected[:i, i], expected[i + 1:, i]])
        assert expected[i, i] > others.max() + 0.2, (u.label, expected[:, i])


def test_gradient_ascent_from_noise_recovers_each_label(units, net):
    # One image per planted unit, optimized together: Adam, projected onto [0, 1],
    # a fresh augmentation per image every step, the objective each unit's patch mean.
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(len(units), 3, SIZE, SIZE, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=0.05)
    features = torch.tensor([u.feature for u in units])
    for _ in range(100):
        acts = net(augmentation(len(units), generator)(images))
        loss = -acts[torch.arange(len(units)), features].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
    images = images.detach()
    for u, image in zip(units, images):
        if u.label in planted.COLOURS:
            colour = image.mean(dim=(1, 2))
            assert torch.allclose(colour, torch.tensor(planted.COLOURS[u.label]), atol=0.1), (u.label, colour)
        else:
            angle, period = dominant_orientation(image)
            target = float(u.label.split()[1].rstrip("°"))
            assert angle_error(angle, target) < 8, (u.label, angle)
            assert abs(period - planted.GRATING_PERIOD) < 1.5, (u.label, period)


def test_a_planted_units_record_has_a_clean_curve_rising_to_its_activation_and_its_page_draws_it(compose, tmp_path):
    """A few steps of the sweep's worker on planted weights: each record's activation_curve, the un-augmented
    image's activation during the run, ends at the record's activation, up from the noise it starts as; the
    atlas built from the store draws that curve."""
    from pipeline.cli import main
    from pipeline.execution.plan import build_plan
    from pipeline.execution.worker import VisualizationWorker
    from pipeline.store.store import Store

    chosen = [u for u in planted.planted_units(MODEL) if u.label in ("red", "grating 45°")]
    root, site = tmp_path / "store", tmp_path / "site"
    cfg = compose(f"sweep.models=[{MODEL}]", "model.weights=planted", f"sweep.layers=[{chosen[0].layer}]",
                  f"sweep.features=[{','.join(str(u.feature) for u in chosen)}]", "optim.steps=6", "optim.copies=2",
                  "optim.trace_points=3", "optim.precision=fp32", f"store.root={root}")
    result = VisualizationWorker("cpu").run(build_plan(cfg).chunks(set(), 8)[0])
    assert not result.failures
    rows = result.records.table.to_pylist()
    assert sorted(row["label"] for row in rows) == ["planted: grating 45°", "planted: red"]
    for row in rows:
        curve = row["activation_curve"]
        assert len(curve) == 4  # the images before steps 0, 2 and 4, then the final image
        assert curve[-1] == pytest.approx(row["activation"], rel=1e-6)
        assert curve[-1] > curve[0] + 0.2, (row["label"], curve)
    with Store(str(root)).writer(commit_every=8) as writer:
        writer.add_encoded(result.records)
    assert main(["atlas", f"store.root={root}", f"out={site}"]) == 0
    for row in rows:
        page = (site / "features" / f"{row['key']}.html").read_text()
        first, last = row["activation_curve"][0], row["activation_curve"][-1]
        assert f"activation of the un-augmented image during optimization: {first:.4g} → {last:.4g}" in page
        assert f"<strong>{row['activation']:.6g}</strong>" in page
