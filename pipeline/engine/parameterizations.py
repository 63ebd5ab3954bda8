"""How the optimized tensors become images: raw pixels, Lucid's Fourier basis, or MACO's phase.

The optimizer (pipeline.engine.optimize.visualize) never touches pixels directly. It asks a
:class:`Parameterization` for the tensors to optimize (``init``), turns them into
images in [0, 1] every step (``images``, differentiable), feeds those images to the
paper's augmentation ensemble, and lets the parameterization put its tensors back
in range after each Adam step (``project``). Every tensor has a leading feature
dimension and every operation acts per feature, so a batch of F features stays F
independent runs, each seeded from its own generator.

* ``pixel``: the paper's. Raw RGB initialised U[0, 1), clamped to [0, 1] after each step.
* ``fourier``: Lucid's ``fft_image`` + ``to_valid_rgb`` (Olah et al., "Feature
  Visualization", Distill 2017). Real and imaginary Fourier coefficients of each
  colour channel, initialised N(0, sd), scaled by 1 / max(f, 1/max(H, W)) ** decay
  (f in cycles per pixel), an orthonormal inverse real FFT, divided by 4 (Lucid's
  constant), mapped through the colour-correlation matrix (decorrelated colour
  space -> RGB) and a sigmoid.
* ``maco``: Fel et al., "Unlocking Feature Visualization for Deeper Networks with
  MAgnitude Constrained Optimization" (NeurIPS 2023), after horama's ``maco_fv``:
  only the phase is optimized; the magnitude is a fixed spectrum.
  image = sigmoid(C @ standardize(irfft2(magnitude * exp(i * phase)))), standardize =
  zero mean, unit std over the feature's whole (3, H, W) tensor (horama's
  ``standardize``, eps 1e-4), C the same colour matrix. horama rescales the sigmoid
  to the model's input range; here the sigmoid's [0, 1] is the pixel range and the
  score applies the model's mean/std. Two departures from horama's code, both
  because this project optimizes the whole image (horama scores random crops of
  20-25% of a larger image, centred near its middle):

  - The phase is initialised uniform on (-pi, pi] and used as is. horama draws it
    N(0, 1) and standardizes it every step, which keeps the phases within about
    +-1 rad: since cos(x) >= 1 - x**2 / 2, cos(phase) then averages at least 0.5,
    so all frequencies add up in phase at pixel (0, 0) (a cusp ~80 std high at 224
    px, measured), a corner horama's crops never see but the whole image does.
  - Crops and the transparency (attribution) accumulator are not implemented; the
    paper's augmentation ensemble (copies, colour shift, noise, jitter) is used.

MACO's spectrum: horama downloads an ImageNet magnitude spectrum on first use; this
project downloads nothing. The default is a power law, magnitude 1 / max(f, 1/max(H, W))
** alpha with alpha = 1: natural images have an amplitude spectrum falling as about
1/f (Field 1987, JOSA A 4(12); van der Schaaf & van Hateren 1996, Vision Research
36(17), measured power-spectrum exponents near 2, i.e. amplitude exponents near 1).
The same magnitude is used for the three decorrelated colour channels, which the
colour matrix has whitened. pipeline.engine.spectra computes an average spectrum
from any folder of images instead (``vit-atlas spectrum
folder=DIR out=OUT.npy``) and reads it back; ``optim.param.spectrum=OUT.npy`` then uses it,
and :func:`spectrum_id` names it by the file's sha256 for the records.

Real images have real Fourier coefficients at up to four self-conjugate frequencies
(the mean, and the Nyquist row/column corners). A phase there cannot be free: the
inverse real FFT keeps the real part, magnitude * cos(phase), which is also what
horama's code gets. So MACO's magnitude is fixed exactly at every frequency but
those (at most four) bins, where it is magnitude * |cos(phase)|; that keeps the
mean colour optimizable. Elsewhere on the two self-paired columns of the half
spectrum (f_x = 0 and, for even widths, Nyquist) the phases of k and -k are tied
(phase(k) = -phase(-k)) so the image's magnitude is exactly the given one.

Each parameterization owns its settings: a dataclass of its knobs (:class:`FourierSettings`, ...) whose
values are conf/optim/param/NAME.yaml, the config group ``optim/param``. A sweep's ``optim.param`` is that
file's mapping (the config layer imports no stage); :func:`settings` types and checks it. Adding a
parameterization is its settings, its class and a line of :data:`PARAMETERIZATIONS` here, and its YAML.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.engine import spectra
from pipeline.engine.spectra import POWERLAW
from pipeline.errors import PipelineError

# Lucid's colour-correlation matrix (lucid/optvis/param/color.py,
# ``color_correlation_svd_sqrt``): the square root of ImageNet's RGB covariance from
# its SVD, columns = decorrelated channels. Normalized by its largest column norm,
# as Lucid and horama (``recorrelate_colors``) both use it.
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02),
                              (0.27, 0.00, -0.05),
                              (0.27, -0.09, 0.03))
FOURIER_SCALE_DIVISOR = 4.0  # Lucid fft_image: "image_t / 4.0"
STANDARDIZE_EPS = 1e-4  # horama common.standardize: x / (std + 1e-4)


def colour_matrix(device: torch.device | str = "cpu") -> torch.Tensor:
    """(3, 3) RGB <- decorrelated colour: rgb = M @ t, M the normalized SVD-sqrt matrix."""
    matrix = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float64)
    return (matrix / matrix.norm(dim=0).max()).float().to(device)


def recorrelate(x: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) decorrelated colour -> RGB (pre-sigmoid)."""
    return torch.einsum("dc,fchw->fdhw", colour_matrix(x.device), x)


def decorrelate(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB -> the decorrelated colour space MACO optimizes in (the inverse of the colour matrix), float64."""
    return torch.einsum("cd,dhw->chw", torch.linalg.inv(colour_matrix().double()), rgb.double())


def radial_frequency(image_size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W // 2 + 1): |f| in cycles per pixel at each bin of a real FFT's half spectrum."""
    height, width = image_size
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    return torch.sqrt(fy * fy + fx * fx)


def inverse_power(image_size: tuple[int, int], power: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W // 2 + 1): 1 / max(f, 1 / max(H, W)) ** power; the mean bin takes the lowest frequency's value."""
    lowest = 1.0 / max(image_size)
    return radial_frequency(image_size, device).clamp(min=lowest) ** -power


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std over everything but the leading (feature) dimension."""
    dims = tuple(range(1, x.ndim))
    return (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + STANDARDIZE_EPS)


class Parameterization(Protocol):
    """What the optimizer asks of an image parameterization.

    ``init`` binds the image size and device and returns the tensors to optimize
    (fp32 leaves with requires_grad, leading dimension = features), drawing feature
    i's initial values from ``generators[i]`` only. ``images`` maps them to
    (F, 3, H, W) in [0, 1], differentiably. ``project`` runs under no_grad after
    every optimizer step and may change the tensors in place.
    """

    def init(self, generators: Sequence[torch.Generator], image_size: tuple[int, int],
             device: torch.device) -> list[torch.Tensor]: ...

    def images(self, params: list[torch.Tensor]) -> torch.Tensor: ...

    def project(self, params: list[torch.Tensor]) -> None: ...


@dataclass
class ParamSettings:
    """What every parameterization's settings hold; each adds its own knobs (conf/optim/param/NAME.yaml)."""

    name: str
    # What ``optim.lr: auto`` becomes, by model family ("default": any other): config.OptimConfig.for_family.
    auto_lr: dict[str, float]

    def prepared(self) -> "ParamSettings":
        """These settings as a sweep plans them, checked before any compute (a file read, a path made absolute
        for workers that start in another directory)."""
        return self

    def identity(self) -> dict[str, Any]:
        """What a unit's config hash covers of these settings: the knobs that shape its image. ``auto_lr``
        enters as the ``optim.lr`` it resolved to."""
        values = dataclasses.asdict(self)
        del values["auto_lr"]
        return values


@dataclass
class PixelSettings(ParamSettings):
    def create(self) -> "Pixel":
        return Pixel()


@dataclass
class FourierSettings(ParamSettings):
    decay: float  # Lucid fft_image(decay_power=1): coefficients scaled by 1/f**decay
    sd: float  # Lucid fft_image(sd=0.01): init std of the Fourier coefficients
    decorrelate: bool  # Lucid param.image(decorrelate=True): colour via the SVD-sqrt matrix

    def __post_init__(self) -> None:
        _check_range("decay", self.decay, strict=False)
        _check_range("sd", self.sd, strict=True)

    def create(self) -> "Fourier":
        return Fourier(self)


@dataclass
class MacoSettings(ParamSettings):
    spectrum: str  # powerlaw | PATH (.npy/.safetensors); horama downloads an ImageNet one
    alpha: float  # powerlaw magnitude 1/f**alpha: natural images' ~1/f amplitude (Field 1987)

    def __post_init__(self) -> None:
        _check_range("alpha", self.alpha, strict=False)

    def prepared(self) -> "MacoSettings":
        if self.spectrum == POWERLAW:
            return self
        spectra.read_spectrum_file(self.spectrum)
        return dataclasses.replace(self, spectrum=str(Path(self.spectrum).expanduser().absolute()))

    def identity(self) -> dict[str, Any]:
        # The spectrum is named by its bytes (or the power law's alpha), not by where it lies: a file rewritten
        # in place makes other images under the same path, a copy elsewhere the same images.
        return {**super().identity(), "spectrum": self.spectrum_id()}

    def spectrum_id(self) -> str:
        """What a record cites for the magnitude: ``powerlaw-<alpha>`` or ``sha256-<file hex digest>``."""
        if self.spectrum == POWERLAW:
            return f"{POWERLAW}-{float(self.alpha)}"
        return f"sha256-{spectra.file_sha256(self.spectrum)}"

    def create(self) -> "Maco":
        return Maco(self)


def _check_range(knob: str, value: float, strict: bool) -> None:
    if value <= 0 if strict else value < 0:
        raise PipelineError(f"optim.param.{knob}={value!r} is out of range: it must be {'>' if strict else '>='} 0.")


class Pixel:
    """The paper's raw RGB pixels: U[0, 1) init, clamped to [0, 1] after every step."""

    def init(self, generators, image_size, device):
        height, width = image_size
        images = torch.stack([torch.rand(3, height, width, generator=g, device=device) for g in generators])
        return [images.requires_grad_(True)]

    def images(self, params):
        return params[0]

    def project(self, params):
        params[0].clamp_(0.0, 1.0)


@dataclass
class Fourier:
    """Lucid's decorrelated Fourier parameterization (``fft_image`` + ``to_valid_rgb``)."""

    settings: FourierSettings
    _size: tuple[int, int] = field(default=(0, 0), init=False, repr=False)
    _scale: torch.Tensor | None = field(default=None, init=False, repr=False)

    def init(self, generators, image_size, device):
        height, width = image_size
        self._size = (height, width)
        self._scale = inverse_power(image_size, self.settings.decay, device)
        shape = (3, height, width // 2 + 1, 2)  # real and imaginary parts
        coefficients = torch.stack([torch.randn(shape, generator=g, device=device) * self.settings.sd
                                    for g in generators])
        return [coefficients.requires_grad_(True)]

    def images(self, params):
        spectrum = torch.view_as_complex(params[0]) * self._scale
        x = torch.fft.irfft2(spectrum, s=self._size, norm="ortho") / FOURIER_SCALE_DIVISOR
        return torch.sigmoid(recorrelate(x) if self.settings.decorrelate else x)

    def project(self, params):
        pass


@dataclass
class Maco:
    """MACO: optimize the phase of a fixed magnitude spectrum (Fel et al. 2023, horama ``maco_fv``)."""

    settings: MacoSettings
    _size: tuple[int, int] = field(default=(0, 0), init=False, repr=False)
    _magnitude: torch.Tensor | None = field(default=None, init=False, repr=False)

    def init(self, generators, image_size, device):
        height, width = image_size
        self._size = (height, width)
        self._magnitude = magnitude_spectrum(self.settings.spectrum, image_size, self.settings.alpha).to(device)
        shape = (3, height, width // 2 + 1)
        phase = torch.stack([(torch.rand(shape, generator=g, device=device) * 2 - 1) * math.pi for g in generators])
        return [phase.requires_grad_(True)]

    def images(self, params):
        return torch.sigmoid(recorrelate(standardize(self.spatial(params[0]))))

    def spatial(self, phase: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W): the inverse real FFT of magnitude * exp(i * phase), before normalization."""
        phase = tie_hermitian(phase, self._size[1])
        spectrum = torch.complex(self._magnitude * torch.cos(phase), self._magnitude * torch.sin(phase))
        return torch.fft.irfft2(spectrum, s=self._size)

    def project(self, params):
        pass


# Each parameterization's settings, by the name conf/optim/param/NAME.yaml gives it.
PARAMETERIZATIONS: dict[str, type[ParamSettings]] = {"pixel": PixelSettings, "fourier": FourierSettings,
                                                     "maco": MacoSettings}


def settings(values: Mapping[str, Any] | ParamSettings) -> ParamSettings:
    """The typed, checked settings of ``optim.param`` (conf/optim/param/NAME.yaml's mapping, as composed)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(values, ParamSettings):
        return values
    name = values.get("name")
    if name not in PARAMETERIZATIONS:
        raise PipelineError(f"optim.param={name!r} is not an image parameterization; "
                            f"valid ones are {', '.join(PARAMETERIZATIONS)}.")
    kind = PARAMETERIZATIONS[name]
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise PipelineError(f"optim.param.{unknown[0]} is not a setting of the {name} parameterization: its "
                            f"settings are {', '.join(known)} (conf/optim/param/{name}.yaml).")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), values))
    except OmegaConfBaseException as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PipelineError(f"Bad setting optim.param.{getattr(error, 'full_key', '') or ''}: {problem}.") from None


def create(values: Mapping[str, Any] | ParamSettings) -> Parameterization:
    """The parameterization ``optim.param`` names, with its knobs."""
    return settings(values).create()


def tie_hermitian(phase: torch.Tensor, width: int) -> torch.Tensor:
    """Make phase(k) = -phase(-k) on the half spectrum's self-paired columns (f_x = 0, and Nyquist
    for even widths), so a real image's spectrum there has exactly the given magnitude; rows that
    are their own mirror (k = -k) keep their phase (their value becomes magnitude * cos(phase))."""
    height, half = phase.shape[-2:]
    mirrored = phase.flip(-2).roll(1, dims=-2)  # row k <- row (-k) mod H
    rows = torch.arange(height, device=phase.device)
    own_mirror = ((-rows) % height == rows)[:, None]
    columns = torch.arange(half, device=phase.device)
    paired = (columns == 0) | ((columns == width // 2) & (width % 2 == 0))
    return torch.where(paired & ~own_mirror, (phase - mirrored) / 2, phase)


# --- MACO magnitude spectra ---------------------------------------------------------------

def powerlaw_spectrum(image_size: tuple[int, int], alpha: float = 1.0) -> torch.Tensor:
    """(3, H, W // 2 + 1): 1 / max(f, 1 / max(H, W)) ** alpha for each decorrelated channel."""
    return inverse_power(image_size, alpha).expand(3, -1, -1).contiguous()


def magnitude_spectrum(spectrum: str, image_size: tuple[int, int], alpha: float = 1.0) -> torch.Tensor:
    """(3, H, W // 2 + 1) on the CPU: ``powerlaw`` or the file at PATH, at ``image_size``."""
    if spectrum == POWERLAW:
        return powerlaw_spectrum(image_size, alpha)
    return spectra.load_spectrum(spectrum, image_size)
