"""Directions as units (``target.directions=PATH``): the rows of a matrix in a target's activation space.

With directions, unit i of a layer is not channel i of the target but direction i: its objective is, per
token, the projection of the target's activations onto the direction, then the same pooling as a neuron's
(the mean over image-patch tokens, or one position). The files read:

- ``.npy``: a float array (n, d), row i the direction of unit i (used as given: a row's length scales its
  objective, nothing is normalized);
- ``.safetensors``: a sparse autoencoder's encoder, ``W_enc`` (d, n) with optional ``b_enc`` (n) and
  ``b_dec`` (d); unit i is latent i's pre-activation (the value before the ReLU),
  ``(x - b_dec) @ W_enc[:, i] + b_enc[i]``; other tensors (``W_dec``, ...) are ignored;
- ``.pt`` / ``.pth``: ``torch.save`` of a dict with those keys, or of a plain (n, d) tensor of rows, loaded
  with ``torch.load(weights_only=True)`` (no pickled objects).

d must be the target's width at every swept layer; n becomes the layer's width (``sweep.features`` indexes
rows). A plan names the file by its sha256 (:class:`DirectionsFile`, in the units' config hash and so in
their keys, and in every record's config); a worker loads the bytes it hashed and refuses a file that
changed since (pipeline.models.weights.read_planned), as it does a checkpoint.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.models import weights

FORMATS = {".npy": "npy", ".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
SAE_KEYS = ("W_enc", "b_enc", "b_dec")


@dataclass(frozen=True)
class DirectionsFile:
    """What a plan knows of a directions file, small enough to travel with every chunk."""

    path: str  # absolute: workers may start in another directory
    sha256: str  # sha256-<hex> of the file's bytes
    format: str  # npy | safetensors | torch
    count: int  # n, the units per layer
    width: int  # d, the target's width the directions live in

    def provenance(self) -> dict[str, str]:
        """What every record's config says of the file."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format}


@dataclass(frozen=True)
class Directions:
    matrix: torch.Tensor  # (n, d) float32: row i is unit i's direction
    bias: torch.Tensor | None  # (n,): added to unit i's projection (an SAE's b_enc)
    centre: torch.Tensor | None  # (d,): subtracted from the activations first (an SAE's b_dec)
    sha256: str
    format: str

    @property
    def count(self) -> int:
        return self.matrix.shape[0]

    @property
    def width(self) -> int:
        return self.matrix.shape[1]

    def projection(self, features: list[int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """activations (F, copies, P, d) -> (F, copies, P): unit ``features[i]`` read from row i of the batch."""
        rows, bias, centre = self._units(features, device)

        def project(activations: torch.Tensor) -> torch.Tensor:
            if centre is not None:
                activations = activations - centre
            projected = torch.einsum("fcpd,fd->fcp", activations, rows)
            return projected if bias is None else projected + bias.view(-1, 1, 1)

        return project

    def projection_of_all(self, features: list[int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """activations (..., d) -> (..., F): every unit of ``features`` on every token, the score
        :meth:`projection` gives one unit (the dataset examples rank every image for every unit)."""
        rows, bias, centre = self._units(features, device)

        def project(activations: torch.Tensor) -> torch.Tensor:
            if centre is not None:
                activations = activations - centre
            projected = activations @ rows.T
            return projected if bias is None else projected + bias

        return project

    def _units(self, features: list[int], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        rows = self.matrix[features].to(device)
        bias = self.bias[features].to(device) if self.bias is not None else None
        centre = self.centre.to(device) if self.centre is not None else None
        return rows, bias, centre


def load_directions(path: str | Path, planned: str | None = None) -> Directions:
    """The directions in the file at ``path``; with ``planned`` (its sha256 id when the sweep was planned) only
    if the file still holds those bytes (weights.PlannedFileChanged otherwise). Any bad file is one
    PipelineError naming it: missing or unreadable, an unknown suffix, no W_enc, shapes that disagree, a
    value that is not finite."""
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise PipelineError(f"target.directions='{path}' has an unknown format '{path.suffix}': use a .npy of rows "
                            f"(n, d), a .safetensors SAE encoder (W_enc (d, n), b_enc (n), optional b_dec (d)), or "
                            f"a torch .pt/.pth file of either.")
    if planned is not None:
        data = weights.read_planned(str(path), planned, "directions file")
    else:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise PipelineError(f"target.directions='{path}' cannot be read ({type(error).__name__}: "
                                f"{error.strerror or error}). Check the path (relative paths are taken from the "
                                f"directory you launch in).") from None
    matrix, bias, centre = _parse(path, kind, data)
    for name, tensor in (("directions", matrix), ("b_enc", bias), ("b_dec", centre)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            bad = sorted({int(i) for i in (~torch.isfinite(tensor)).nonzero()[:, 0][:5]})
            where = f"rows {bad}" if name == "directions" else f"entries {bad}"
            raise PipelineError(f"target.directions='{path}' holds values that are not finite (NaN or inf) in its "
                                f"{name}, {where}: every unit would score NaN. Fix or drop those rows.")
    return Directions(matrix, bias, centre, weights.bytes_id(data), kind)


def plan_directions(path: str) -> DirectionsFile:
    """The file a sweep's ``target.directions`` names, checked whole before any compute."""
    absolute = Path(path).expanduser().absolute()
    directions = _checked(str(absolute), absolute.stat().st_mtime_ns if absolute.is_file() else 0)
    return DirectionsFile(str(absolute), directions.sha256, directions.format, directions.count, directions.width)


@functools.lru_cache(maxsize=4)
def _checked(path: str, _mtime_ns: int) -> Directions:
    """Planning reads a file once per process while its mtime stays the same (each model and grid point asks)."""
    return load_directions(path)


def planned_directions(source: DirectionsFile) -> Directions:
    """What a worker projects onto: the planned file's bytes, loaded once per worker."""
    return recorded_directions(source.path, source.sha256)


@functools.lru_cache(maxsize=2)
def recorded_directions(path: str, sha256: str) -> Directions:
    """The file a record's config names (``directions: {path, sha256}``), loaded once per worker if it still
    holds those bytes (weights.PlannedFileChanged otherwise)."""
    return load_directions(path, sha256)


def check_width(source: DirectionsFile, width: int, target: str, where: str) -> None:
    if source.width != width:
        raise PipelineError(f"target.directions='{source.path}' holds directions of width {source.width}, but target "
                            f"'{target}' at {where} has width {width}: each direction must live in the activation "
                            f"space of the target at the swept layer (`vit-atlas zoo describe=[MODEL]` lists the "
                            f"widths). Choose the layer and target the directions were fitted on.")


def _parse(path: Path, kind: str, data: bytes) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    try:
        if kind == "npy":
            loaded: object = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
        elif kind == "safetensors":
            from safetensors.torch import load

            loaded = load(data)
        else:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # each reader raises its own types; all mean "not such a file"
        detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
        raise PipelineError(f"target.directions='{path}' could not be read as a {kind} file ({type(error).__name__}: "
                            f"{detail}). It may be truncated or corrupt, hold non-numeric or pickled data (refused "
                            f"for safety), or be another format under a {path.suffix} name.") from None
    if isinstance(loaded, torch.Tensor):
        if kind == "safetensors" or loaded.dim() != 2:
            raise PipelineError(f"target.directions='{path}' holds an array of shape {tuple(loaded.shape)}: a matrix "
                                f"of directions is 2-D, (n, d), one row per unit.")
        return loaded.float(), None, None
    if not isinstance(loaded, dict) or "W_enc" not in loaded:
        keys = sorted(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__
        raise PipelineError(f"target.directions='{path}' has no W_enc (found {keys}): a dictionary file is an SAE "
                            f"encoder, W_enc (d, n) with optional b_enc (n) and b_dec (d), or (.npy, .pt) a matrix "
                            f"(n, d) of rows.")
    tensors = {name: loaded[name] for name in SAE_KEYS if name in loaded}
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise PipelineError(f"target.directions='{path}': W_enc, b_enc and b_dec must be tensors.")
    encoder = tensors["W_enc"].float()
    d, n = encoder.shape if encoder.dim() == 2 else (-1, -1)
    expected = {"W_enc": (d, n), "b_enc": (n,), "b_dec": (d,)}
    wrong = [f"{name} {tuple(t.shape)}" for name, t in tensors.items() if tuple(t.shape) != expected[name] or d < 0]
    if wrong:
        raise PipelineError(f"target.directions='{path}' has tensors of inconsistent shapes ({', '.join(wrong)}): an "
                            f"SAE encoder is W_enc (d, n), b_enc (n), b_dec (d).")
    bias, centre = (tensors[name].float() if name in tensors else None for name in ("b_enc", "b_dec"))
    return encoder.T.contiguous(), bias, centre
