"""Planted weights: a ViT whose chosen MLP units are built to prefer known stimuli.

Random or pretrained weights cannot tell whether the visualization optimizer works:
nobody knows what their units "should" look like. Planted weights can. Starting
from timm's own seeded random init, this module rewrites a few parameters so that
MLP units ``0 .. n-1`` of block ``PLANTED_LAYER`` respond to

* a uniform colour (red, green, blue, yellow, cyan, magenta): the unit reads the
  patch-mean RGB through a zero-sum colour-opponent weight, whose argmax over the
  [0, 1] colour cube is exactly that colour; zero-sum means grey (and any grating
  around grey) gives 0, and the per-channel colour-shift augmentation keeps the
  intended colour first in expectation;
* a sinusoidal grating of one orientation (0°, 45°, 90°, 135°) at the planted
  period, whatever its phase: a "complex cell". The patch embedding computes a
  quadrature pair (cos and sin filter) per orientation; block 0's MLP combines
  each pair into 8 phase directions and rectifies both signs with GELU, whose sum
  is nearly independent of the grating's phase; block 0 writes that energy into
  one residual dimension per orientation. The planted unit reads its own energy
  minus a fraction of the other orientations' energy. Phase invariance matters
  because the optimizer's jitter shifts the image every step, which averages any
  linear (phase-sensitive) unit's response to about zero.

How the residual stream is laid out (see ``_Layout``):

* Every signal s is written twice, as +s and -s, so the LayerNorm mean over
  dimensions is exactly the mean of the carrier (zero).
* The remaining dimensions carry a large constant +A/-A pattern from the patch
  embedding bias. It dominates the LayerNorm variance, so LayerNorm divides the
  small signals by an almost constant sigma and acts nearly linearly on them.
* Position embedding and prefix tokens (CLS etc.) are zero and the attention
  output projections of blocks 0..PLANTED_LAYER are zero, so every patch token
  is processed on its own up to the planted units; block 0's MLP writes only the
  energy dimensions. Later blocks keep their random init: they are never read by
  the planted units, and the model still runs end to end.

Orientation convention: a grating of angle t varies along the direction
(cos t, -sin t) in (column, row) pixel coordinates, i.e. t is counter-clockwise
on screen from the x-axis: 0° has vertical stripes, 90° horizontal stripes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError

PLANTED_VERSION = "v1"

# Block whose MLP units are planted; block 0 before it computes grating energies.
PLANTED_LAYER = 1

# Grating period in pixels. 8 px gives two full cycles per 16 px patch, where the
# un-windowed patch filter leaks ~12% energy to a grating 45° away (~27% at 22.5°).
GRATING_PERIOD = 8.0
GRATING_ANGLES = (0, 45, 90, 135)

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}

# Model names the tests and documentation cite; any timm model passing
# `_check_supported` works as well.
EXAMPLE_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224",
                  "vit_base_patch32_224")
SUPPORTED_PATCH_SIZES = (16, 32)

CARRIER = 50.0  # amplitude A of the constant pattern; signals stay below ~10
PHASE_DIRECTIONS = 8  # directions per quadrature pair; the summed ripple is ~2%
ENERGY_GAIN = 4.0  # block-0 pre-activation for a unit-amplitude grating: GELU ~ ReLU there
COLOUR_GAIN = 2.0  # planted colour unit's pre-activation for its own colour
GRATING_GAIN = 2.0  # planted grating unit's pre-activation for unit energy
# Weight of the other orientations' energy. Above the 45° leak (~0.12) so a grating
# 45° away drives the unit negative, below 1/3 so orientation-less noise (equal
# energy everywhere) still gives a positive pre-activation and thus a gradient.
OPPONENT_WEIGHT = 0.25


@dataclass(frozen=True)
class PlantedUnit:
    layer: int
    feature: int
    label: str  # e.g. "red", "grating 45°"


def grating_label(angle_deg: int) -> str:
    return f"grating {angle_deg}°"


_LABELS = list(COLOURS) + [grating_label(a) for a in GRATING_ANGLES]


def planted_units(model_name: str = "deit_tiny_patch16_224") -> list[PlantedUnit]:
    """The planted units of ``model_name``: MLP features 0..9 of block PLANTED_LAYER."""
    with torch.device("meta"):  # structure only; no memory, no init cost
        _check_supported(model_name, _create(model_name))
    return [PlantedUnit(PLANTED_LAYER, feature, label) for feature, label in enumerate(_LABELS)]


def planted_state_dict(model_name: str = "deit_tiny_patch16_224", seed: int = 0) -> dict[str, torch.Tensor]:
    """timm's random init under ``torch.manual_seed(seed)``, with the planted units built in.

    Loads into ``timm.create_model(model_name)`` with ``strict=True``.
    """
    with torch.random.fork_rng(devices=[]):  # seed timm's init without touching the caller's RNG
        torch.manual_seed(seed)
        model = _create(model_name)
    _check_supported(model_name, model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.pretrained_cfg
    layout = _Layout(model.embed_dim)
    patch = model.patch_embed.patch_size[0]

    # Input: the model sees z_c = (x_c - mean_c) / std_c; every patch-embedding row
    # is written in terms of the raw pixel x_c via weight w * std_c, bias sum(w * mean_c).
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    weight = torch.zeros_like(sd["patch_embed.proj.weight"])
    bias = torch.zeros_like(sd["patch_embed.proj.bias"])

    def embed(dim: int, raw: torch.Tensor) -> None:  # raw: (3, P, P) filter on raw pixels
        for d, sign in ((dim, 1.0), (layout.mirror(dim), -1.0)):
            weight[d] = sign * raw * std
            bias[d] = sign * (raw * mean).sum()

    for c, dim in enumerate(layout.rgb):  # patch-mean of each channel
        raw = torch.zeros(3, patch, patch)
        raw[c] = 1.0 / patch**2
        embed(dim, raw)
    for angle, (cos_dim, sin_dim) in zip(GRATING_ANGLES, layout.quadrature):
        for dim, phase in ((cos_dim, 0.0), (sin_dim, math.pi / 2)):
            embed(dim, _patch_filter(angle, phase, patch).expand(3, -1, -1) / 3)  # on luminance
    bias[layout.carrier] = CARRIER * torch.tensor([1.0, -1.0]).repeat(len(layout.carrier) // 2)
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = weight, bias

    for name in ("pos_embed", "cls_token", "reg_token", "dist_token"):
        if name in sd:
            sd[name].zero_()
    for block in range(PLANTED_LAYER + 1):
        sd[f"blocks.{block}.attn.proj.weight"].zero_()
        if f"blocks.{block}.attn.proj.bias" in sd:
            sd[f"blocks.{block}.attn.proj.bias"].zero_()
        # Plain normalization in front of the MLPs that read the signals.
        sd[f"blocks.{block}.norm2.weight"].fill_(1.0)
        sd[f"blocks.{block}.norm2.bias"].zero_()

    # LayerNorm divides the signals by the carrier's RMS; reading weights undo it.
    sigma = CARRIER * math.sqrt(len(layout.carrier) / model.embed_dim)
    _plant_energy_cells(sd, layout, sigma)
    _plant_units(sd, layout, sigma)
    return sd


def colour_image(label: str, size: int = 224) -> torch.Tensor:
    """The whole image in one planted colour, (3, size, size) in [0, 1]."""
    if label not in COLOURS:
        raise PipelineError(f"No planted colour {label!r}; the planted colours are {', '.join(COLOURS)}.")
    return torch.tensor(COLOURS[label]).view(3, 1, 1).expand(3, size, size).clone()


def grating_image(angle_deg: float, phase: float, size: int = 224) -> torch.Tensor:
    """A grey full-contrast sinusoidal grating at the planted period, (3, size, size) in [0, 1]."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                                torch.arange(size, dtype=torch.float64), indexing="ij")
    wave = torch.cos(_grating_argument(angle_deg, cols, rows) + phase)
    return (0.5 + 0.5 * wave).float().expand(3, -1, -1).clone()


def stimulus(label: str, size: int = 224, phase: float = 0.0) -> torch.Tensor:
    """The image a planted unit with this label was built to prefer."""
    for angle in GRATING_ANGLES:
        if label == grating_label(angle):
            return grating_image(angle, phase, size)
    return colour_image(label, size)


class _Layout:
    """Which residual dimensions hold which signal; each signal also has a negated mirror."""

    def __init__(self, embed_dim: int):
        self.rgb = [0, 1, 2]
        self.quadrature = [(3 + 2 * i, 4 + 2 * i) for i in range(len(GRATING_ANGLES))]  # (cos, sin)
        self.energy = [3 + 2 * len(GRATING_ANGLES) + i for i in range(len(GRATING_ANGLES))]
        self.n_signals = self.energy[-1] + 1
        first_free = 2 * self.n_signals
        self.carrier = list(range(first_free, first_free + (embed_dim - first_free) // 2 * 2))

    def mirror(self, dim: int) -> int:
        return dim + self.n_signals

    def read(self, row: torch.Tensor, dim: int, value: float) -> None:
        """Make an fc1 row read ``value`` times signal ``dim`` (half from each copy)."""
        row[dim] += value / 2
        row[self.mirror(dim)] -= value / 2


def _plant_energy_cells(sd: dict[str, torch.Tensor], layout: _Layout, sigma: float) -> None:
    """Block 0: for each orientation, sum of GELU-rectified projections of the quadrature pair."""
    fc1_w, fc1_b = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.bias"]
    fc2_w, fc2_b = sd["blocks.0.mlp.fc2.weight"], sd["blocks.0.mlp.fc2.bias"]
    fc2_w.zero_()
    fc2_b.zero_()
    if "blocks.0.ls2.gamma" in sd:  # LayerScale would shrink what block 0 writes
        sd["blocks.0.ls2.gamma"].fill_(1.0)
    directions = torch.arange(PHASE_DIRECTIONS) * math.pi / PHASE_DIRECTIONS
    # Sum of the rectified responses to a unit-amplitude grating, so the written energy is ~1.
    projections = ENERGY_GAIN * torch.cos(directions)
    unit_energy = (F.gelu(projections) + F.gelu(-projections)).sum().item()
    hidden = 0
    for (cos_dim, sin_dim), energy_dim in zip(layout.quadrature, layout.energy):
        for direction in directions.tolist():
            for sign in (1.0, -1.0):
                fc1_w[hidden].zero_()
                layout.read(fc1_w[hidden], cos_dim, sign * ENERGY_GAIN * sigma * math.cos(direction))
                layout.read(fc1_w[hidden], sin_dim, sign * ENERGY_GAIN * sigma * math.sin(direction))
                fc1_b[hidden] = 0.0
                fc2_w[energy_dim, hidden] = 1.0 / unit_energy
                fc2_w[layout.mirror(energy_dim), hidden] = -1.0 / unit_energy
                hidden += 1


def _plant_units(sd: dict[str, torch.Tensor], layout: _Layout, sigma: float) -> None:
    fc1_w = sd[f"blocks.{PLANTED_LAYER}.mlp.fc1.weight"]
    fc1_b = sd[f"blocks.{PLANTED_LAYER}.mlp.fc1.bias"]
    for feature, label in enumerate(_LABELS):
        row = fc1_w[feature]
        row.zero_()
        fc1_b[feature] = 0.0
        if label in COLOURS:
            # Zero-sum opponent weights scaled so the unit's own colour reads exactly 1.
            target = torch.tensor(COLOURS[label])
            opponent = (target - target.mean()) / ((target - target.mean()) @ target)
            for dim, value in zip(layout.rgb, opponent.tolist()):
                layout.read(row, dim, COLOUR_GAIN * sigma * value)
        else:
            own = _LABELS.index(label) - len(COLOURS)
            for i, dim in enumerate(layout.energy):
                layout.read(row, dim, GRATING_GAIN * sigma * (1.0 if i == own else -OPPONENT_WEIGHT))


def _grating_argument(angle_deg: float, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    t = math.radians(angle_deg)
    return 2 * math.pi / GRATING_PERIOD * (cols * math.cos(t) - rows * math.sin(t))


def _patch_filter(angle_deg: float, phase: float, patch: int) -> torch.Tensor:
    """Zero-mean sinusoid over one patch, scaled so a matched grating of amplitude 0.5 gives 1.

    Zero mean makes it blind to uniform colour and to the colour-shift offsets.
    """
    centre = (patch - 1) / 2
    rows, cols = torch.meshgrid(torch.arange(patch, dtype=torch.float64) - centre,
                                torch.arange(patch, dtype=torch.float64) - centre, indexing="ij")
    w = torch.cos(_grating_argument(angle_deg, cols, rows) + phase)
    w = w - w.mean()
    return (w / (0.5 * (w * w).sum())).float()


def _create(model_name: str) -> nn.Module:
    import timm  # after `pipeline`, which installs the torchvision shim timm needs

    try:
        return timm.create_model(model_name, pretrained=False)
    except RuntimeError as error:  # timm's "Unknown model"
        raise PipelineError(f"timm has no model {model_name!r} ({error}). {_SUPPORTED}") from error


_SUPPORTED = (
    "Planted weights exist for timm VisionTransformer models with pre-norm LayerNorm blocks, GELU MLPs, "
    f"a biased patch embedding with {' or '.join(map(str, SUPPORTED_PATCH_SIZES))} px patches, no pre-norm "
    f"and at least 2 blocks and 64 embedding dimensions, for example {', '.join(EXAMPLE_MODELS)}; "
    "use one of those, or random or pretrained weights for this model."
)


def _check_supported(model_name: str, model: nn.Module) -> None:
    from timm.models.vision_transformer import Block, VisionTransformer

    def fail(reason: str) -> None:
        raise PipelineError(f"No planted construction for {model_name!r}: {reason}. {_SUPPORTED}")

    if not isinstance(model, VisionTransformer):
        fail(f"it is a {type(model).__name__}, not a VisionTransformer")
    proj = model.patch_embed.proj
    if not isinstance(proj, nn.Conv2d) or proj.bias is None or proj.kernel_size != proj.stride:
        fail("its patch embedding is not a biased, non-overlapping convolution")
    if proj.kernel_size[0] != proj.kernel_size[1] or proj.kernel_size[0] not in SUPPORTED_PATCH_SIZES:
        fail(f"its patches are {proj.kernel_size} px")
    if not (isinstance(model.patch_embed.norm, nn.Identity) and isinstance(model.norm_pre, nn.Identity)):
        fail("it normalizes the patch embedding before the first block")
    if len(model.blocks) <= PLANTED_LAYER or model.embed_dim < 64:
        fail(f"it has {len(model.blocks)} blocks of width {model.embed_dim}")
    for block in model.blocks[:PLANTED_LAYER + 1]:
        if not (type(block) is Block and isinstance(block.norm2, nn.LayerNorm) and block.norm2.elementwise_affine
                and type(block.mlp.act) is nn.GELU
                and isinstance(block.mlp.norm, nn.Identity) and block.mlp.fc1.bias is not None
                and block.mlp.fc1.out_features >= 2 * PHASE_DIRECTIONS * len(GRATING_ANGLES)):
            fail("its first blocks are not plain pre-norm blocks with LayerNorm and a GELU MLP")
