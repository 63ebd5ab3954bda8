"""Image descriptors and seed agreement on constructed inputs whose answers are known in advance."""

import math

import numpy as np
import pytest
import torch

from pipeline.engine import descriptors
from pipeline.store.png import encode_png
from pipeline.engine.descriptors import (DESCRIPTORS, baseline_gap, describe, describe_png, descriptor_table,
                                  reliability, seed_similarity, superstimulus_ratio)

SIZE = 224


def grating(period: float, angle_cycles: tuple[int, int] | None = None, size: int = SIZE) -> torch.Tensor:
    """A grey full-contrast cosine grating, (3, size, size) in [0, 1]: vertical bars of ``period`` px,
    or, with ``angle_cycles=(cy, cx)``, cy and cx whole cycles across the rows and columns."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                indexing="ij")
    phase = 2 * math.pi * cols / period if angle_cycles is None else \
        2 * math.pi * (angle_cycles[0] * rows + angle_cycles[1] * cols) / size
    return (0.5 + 0.5 * torch.cos(phase)).float().expand(3, -1, -1).clone()


def flat(colour, size: int = SIZE) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, dtype=np.uint8), (size, size, 3)).copy()


def halves(left, right, size: int = SIZE) -> np.ndarray:
    image = flat(left, size)
    image[:, size // 2:] = right
    return image


def step(contrast: float, size: int = SIZE) -> torch.Tensor:
    """Grey: 0 on the left half, ``contrast`` on the right (on the torus: two vertical step edges)."""
    image = torch.zeros(3, size, size)
    image[:, :, size // 2:] = contrast
    return image


def uniform_noise(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def grid_radius(size: int = SIZE) -> np.ndarray:
    """Radial frequency of every non-DC bin of a size x size DFT, from numpy's own fftfreq."""
    f = np.fft.fftfreq(size)
    return np.hypot(f[:, None], f[None, :]).ravel()[1:]


# --- the descriptor list --------------------------------------------------------------------------


def test_describe_returns_every_descriptor_in_order_as_floats():
    values = describe(uniform_noise())
    assert list(values) == list(DESCRIPTORS)
    assert all(type(v) is float for v in values.values())
    assert {"spectral_centroid", "high_frequency_share", "colourfulness", "edge_density", "png_bytes"} <= set(values)


def test_descriptor_table_has_one_row_per_descriptor_with_unit_and_definition():
    table = descriptor_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| name | unit | definition |"
    assert len(lines) == 2 + len(DESCRIPTORS)
    for line, (name, (unit, definition)) in zip(lines[2:], DESCRIPTORS.items()):
        assert line.startswith(f"| `{name}` | {unit} | ")
        assert line.count(" | ") == 2  # no stray pipes from a definition
    odd = {"a": descriptors.Descriptor("x|y", "p | q")}
    assert descriptor_table(odd).splitlines()[2] == "| `a` | x\\|y | p \\| q |"


# --- spectrum -------------------------------------------------------------------------------------


@pytest.mark.parametrize("period", [16, 8, 4, 7, 9])
def test_grating_centroid_is_its_frequency(period):
    # 9 px does not fit 224 px a whole number of times: the unwindowed spectrum leaks, but little.
    values = describe(grating(period))
    assert values["spectral_centroid"] == pytest.approx(1 / period, abs=0.01)


def test_oblique_and_horizontal_gratings_centroid_is_the_radial_frequency():
    assert describe(grating(0, angle_cycles=(28, 28)))["spectral_centroid"] == pytest.approx(
        math.hypot(28, 28) / SIZE, abs=0.001)
    assert describe(grating(0, angle_cycles=(28, 0)))["spectral_centroid"] == pytest.approx(0.125, abs=0.001)


def test_fine_grating_has_more_high_frequency_share_than_coarse():
    fine, coarse = describe(grating(4)), describe(grating(16))
    assert fine["high_frequency_share"] > coarse["high_frequency_share"]
    assert fine["high_frequency_share"] == pytest.approx(1.0, abs=1e-3)  # 0.25 c/px: the cut-off is inclusive
    assert coarse["high_frequency_share"] == pytest.approx(0.0, abs=1e-3)


def test_white_noise_spectrum_matches_the_discrete_grid():
    # Every non-DC bin of iid noise has the same expected power, so the expected share above the cut-off
    # is the share of bins above it, and the centroid is the grid's mean radius (0 .. sqrt(2)/2).
    radius = grid_radius()
    expected_share = float(np.mean(radius >= descriptors.HIGH_FREQUENCY_CUTOFF))
    expected_centroid = float(radius.mean())
    assert expected_share == pytest.approx(1 - math.pi / 16, abs=0.005)  # the continuum value, as a check
    for seed in range(2):
        values = describe(uniform_noise(seed))
        assert values["high_frequency_share"] == pytest.approx(expected_share, abs=0.01)
        assert values["spectral_centroid"] == pytest.approx(expected_centroid, abs=0.005)


def test_flat_image_spectrum_is_undefined_and_has_no_edges():
    for colour in [(0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 0, 0), (12, 200, 77)]:
        values = describe(flat(colour))
        assert math.isnan(values["spectral_centroid"])
        assert math.isnan(values["high_frequency_share"])
        assert values["edge_density"] == 0.0
        assert values["rms_contrast"] == 0.0


def test_descriptors_do_not_see_where_the_torus_is_cut():
    # The optimizer's images are periodic (circular jitter), so a circular shift must not change them.
    image = torch.cat([uniform_noise()[:, :, :112] * 0.3, grating(8)[:, :, 112:]], dim=2)
    image[0] *= 0.5
    before, after = describe(image), describe(torch.roll(image, shifts=(37, -90), dims=(1, 2)))
    for name in ("spectral_centroid", "high_frequency_share", "edge_density", "rms_contrast", "colourfulness"):
        assert after[name] == pytest.approx(before[name], rel=1e-9), name


# --- edges ----------------------------------------------------------------------------------------


def test_edge_density_counts_the_two_pixel_columns_of_each_step_above_the_threshold():
    # A one-pixel step of contrast c gives Sobel/8 = c/2 on its two sides; the torus has two steps.
    assert describe(step(1.0))["edge_density"] == pytest.approx(4 / SIZE)
    assert describe(step(0.25))["edge_density"] == pytest.approx(4 / SIZE)
    assert describe(step(0.15))["edge_density"] == 0.0  # 0.075 < EDGE_THRESHOLD


def test_gentle_shading_is_not_an_edge_but_fine_texture_and_noise_are():
    # 56 px fits 224 px 4 times, so the torus has no seam; its max slope is 2 pi 0.5 / 56 = 0.056 per pixel.
    assert describe(grating(56))["edge_density"] == 0.0
    assert describe(grating(64))["edge_density"] == pytest.approx(2 / SIZE)  # 3.5 cycles: the seam is an edge
    assert describe(grating(8))["edge_density"] > 0.5
    assert describe(uniform_noise())["edge_density"] > 0.3


# --- colour ---------------------------------------------------------------------------------------


def test_grey_images_have_no_colourfulness():
    assert describe(flat((128, 128, 128)))["colourfulness"] == 0.0
    assert describe(halves((0, 0, 0), (255, 255, 255)))["colourfulness"] == 0.0
    assert describe(grating(8))["colourfulness"] == 0.0


def test_two_colour_images_match_hand_computed_m3():
    # red | green: rg = +-255 (sd 255, mean 0), yb = 127.5 everywhere (sd 0, mean 127.5).
    red_green = describe(halves((255, 0, 0), (0, 255, 0)))["colourfulness"]
    assert red_green == pytest.approx(255 + 0.3 * 127.5)
    # red | blue: rg in {255, 0} (sd 127.5, mean 127.5), yb in {127.5, -255} (sd 191.25, mean -63.75).
    red_blue = describe(halves((255, 0, 0), (0, 0, 255)))["colourfulness"]
    assert red_blue == pytest.approx(math.hypot(127.5, 191.25) + 0.3 * math.hypot(127.5, 63.75))
    assert min(red_green, red_blue) > 109  # Hasler & Suesstrunk's "extremely colourful"
    # One saturated colour everywhere is colourful only through the mean term.
    assert describe(flat((255, 0, 0)))["colourfulness"] == pytest.approx(0.3 * math.hypot(255, 127.5))


# --- PNG and inputs -------------------------------------------------------------------------------


def test_noise_compresses_far_worse_than_flat():
    noise, flat_grey = describe(uniform_noise())["png_bytes"], describe(flat((128, 128, 128)))["png_bytes"]
    assert noise > 50 * flat_grey


def test_tensor_and_its_stored_png_describe_alike():
    image = torch.cat([uniform_noise()[:, :, :100], grating(8)[:, :, 100:]], dim=2)
    stored = encode_png(image)  # how the worker stores it: clamp, x255, round half to even, uint8
    from_tensor, from_png = describe(image), describe_png(stored)
    assert from_tensor == from_png
    assert from_tensor["png_bytes"] == len(stored)
    assert describe(image, png=b"x" * 123)["png_bytes"] == 123.0


@pytest.mark.parametrize("bad", [torch.zeros(224, 224, 3), torch.zeros(3, 224, 224, dtype=torch.uint8),
                                 np.zeros((3, 224, 224), np.uint8), np.zeros((224, 224, 3)), [[0.0]],
                                 torch.zeros(3, 2, 224)])
def test_describe_rejects_ambiguous_or_wrong_images(bad):
    with pytest.raises((TypeError, ValueError)):
        describe(bad)


def test_describe_rejects_non_finite_pixels():
    image = uniform_noise()
    image[0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        describe(image)


# --- seeds ----------------------------------------------------------------------------------------


def test_seed_similarity_is_the_cosine():
    v = torch.tensor([1.0, 2.0, -3.0, 0.5])
    assert seed_similarity(v, v) == pytest.approx(1.0)
    assert seed_similarity(v, 7 * v) == pytest.approx(1.0)
    assert seed_similarity(v, -v) == pytest.approx(-1.0)
    assert seed_similarity(torch.tensor([1.0, 0, 0]), torch.tensor([0, 3.0, 0])) == pytest.approx(0.0)
    assert seed_similarity(np.array([1.0, 1.0]), [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(seed_similarity(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError):
        seed_similarity(torch.ones(3), torch.ones(4))


def test_center_removes_the_component_every_image_shares():
    shared = torch.tensor([10.0, 10.0, 10.0, 10.0])
    a, b = shared + torch.tensor([1.0, 0, 0, 0]), shared + torch.tensor([0, 1.0, 0, 0])
    assert seed_similarity(a, b) > 0.9
    assert seed_similarity(a, b, center=shared) == pytest.approx(0.0)
    assert reliability([a, b], center=shared) == pytest.approx(0.0)


def test_reliability_on_identical_orthogonal_and_opposite_vectors():
    v = torch.tensor([0.3, -1.0, 2.0])
    assert reliability([v, v, v]) == pytest.approx(1.0)
    assert reliability([v, 2 * v]) == pytest.approx(1.0)
    assert reliability(list(torch.eye(5))) == pytest.approx(0.0, abs=1e-12)
    assert reliability([v, -v]) == pytest.approx(-1.0)
    e = torch.eye(3)
    assert reliability([e[0], e[0], e[1]]) == pytest.approx(1 / 3)  # pairs: 1, 0, 0
    assert reliability([v, -v, v]) == pytest.approx(-1 / 3)  # pairs: -1, 1, -1


def test_reliabilities_of_many_units_are_each_units_mean_pairwise_cosine_after_centring():
    rng = np.random.default_rng(4)
    # float32 embeddings, as stored
    vectors, centres = rng.normal(size=(40, 3, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    vectors[7, 2] = centres[7]  # a seed's vector equal to the centre: zero once centred
    found = descriptors.reliabilities(vectors, centres)
    for unit in range(40):
        centred = torch.as_tensor(vectors[unit], dtype=torch.float64) - torch.as_tensor(centres[unit], dtype=torch.float64)
        pairs = [torch.nn.functional.cosine_similarity(centred[i], centred[j], dim=0, eps=0)
                 for i, j in ((0, 1), (0, 2), (1, 2))]
        if unit == 7:
            assert math.isnan(found[unit])
        else:
            assert found[unit] == pytest.approx(float(sum(pairs) / 3), abs=1e-12)
    with pytest.raises(ValueError, match="seeds >= 2"):
        descriptors.reliabilities(np.ones((4, 1, 3)))


def test_reliability_is_undefined_below_two_seeds_or_for_zero_vectors():
    assert math.isnan(reliability([]))
    assert math.isnan(reliability([torch.ones(3)]))
    assert math.isnan(reliability([torch.ones(3), torch.zeros(3)]))
    with pytest.raises(ValueError):
        reliability([torch.ones(3), torch.ones(2)])


# --- activations ----------------------------------------------------------------------------------


def test_superstimulus_ratio_and_baseline_gap():
    assert superstimulus_ratio(3.0, 2.0) == pytest.approx(1.5)
    assert math.isnan(superstimulus_ratio(3.0, 0.0))
    assert math.isnan(superstimulus_ratio(3.0, -1.0))
    assert superstimulus_ratio(3.0, 2.0, baseline=1.0) == pytest.approx(2.0)
    assert superstimulus_ratio(1.0, 2.0, baseline=1.0) == pytest.approx(0.0)
    assert math.isnan(superstimulus_ratio(3.0, 1.0, baseline=1.0))
    # Affine in the unit: shifting and scaling every activation leaves the baseline form unchanged.
    assert superstimulus_ratio(5 * 3.0 - 4, 5 * 2.0 - 4, baseline=5 * 1.0 - 4) == pytest.approx(2.0)
    assert baseline_gap(5.0, noise=1.0, grey=2.0) == pytest.approx(3.0)
    assert baseline_gap(5.0, noise=2.5, grey=-1.0) == pytest.approx(2.5)
