"""Weights for a zoo architecture: pretrained (timm hub), seeded random, planted, or a local file.

``model.weights`` takes one of:
- ``pretrained``: timm's default (or the name's ``.tag``) weights from the Hugging Face hub,
  honouring an existing cache and HF_HUB_OFFLINE;
- ``random``: timm's own init under ``torch.manual_seed(model.init_seed)``;
- ``planted``: seeded random weights with units wired to prefer known stimuli (pipeline.planted);
- a path: a ``.safetensors`` file, a torch state-dict file (loaded with weights_only=True),
  an original Google ViT ``.npz`` (through timm's own loader), or a directory that holds
  ``<model name>.safetensors`` (or ``.pth``/``.npz``) per model, for sweeps over several models.

Every record carries a weights id: ``random-<seed>``, ``pretrained-<tag>``, ``planted-<version>-<seed>``
or ``sha256-<hex of the file>``. :func:`resolve` validates a choice and computes its id
cheaply, before any compute; :func:`load` builds the model. A file is checked at plan time
against the architecture (names and shapes; an ``.npz`` goes through timm's loader into the
architecture built on the meta device) and, when a worker loads it later, against the planned
hash: the worker reads the file once, hashes those bytes and loads from them, so a file
replaced in between fails its units (:class:`CheckpointChanged`) instead of being recorded
under the old hash.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.models import zoo
from pipeline.errors import PipelineError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class CheckpointChanged(PipelineError):
    """The file at a planned checkpoint path is not the one the sweep was planned with."""


@dataclass(frozen=True)
class WeightsChoice:
    kind: str  # random | pretrained | planted | file
    weights_id: str
    path: str | None = None
    init_seed: int = 0


def resolve(model_name: str, weights: str, init_seed: int = 0) -> WeightsChoice:
    """Validate ``weights`` for ``model_name`` without building the model; raise a clear error otherwise."""
    zoo.family_of(model_name)
    if weights == "random":
        return WeightsChoice("random", f"random-{init_seed}", init_seed=init_seed)
    if weights == "planted":
        from pipeline.models import planted

        planted.planted_units(model_name)  # raises for models without a planted construction
        return WeightsChoice("planted", f"planted-{planted.PLANTED_VERSION}-{init_seed}", init_seed=init_seed)
    if weights == "pretrained":
        return WeightsChoice("pretrained", f"pretrained-{_pretrained_tag(model_name)}")
    path = _checkpoint_path(model_name, Path(weights).expanduser())
    _check_checkpoint(model_name, path)
    return WeightsChoice("file", f"sha256-{_sha256(str(path), path.stat().st_mtime_ns)}", path=str(path))


def load(model_name: str, choice: WeightsChoice, device: torch.device | str = "cpu") -> nn.Module:
    """The model in eval mode on ``device``, parameters frozen (only the input image is optimized)."""
    if choice.kind == "pretrained":
        model = _load_pretrained(model_name)
    else:
        data = _read_planned(choice) if choice.kind == "file" else None  # before building: a changed file fails fast
        torch.manual_seed(choice.init_seed)
        model = zoo.create_architecture(model_name)
        if choice.kind == "planted":
            from pipeline.models import planted

            model.load_state_dict(planted.planted_state_dict(model_name, seed=choice.init_seed))
        elif choice.kind == "file":
            _load_file(model, Path(choice.path), data)
            del data
    model.requires_grad_(False)
    return model.eval().to(device)


def _pretrained_tag(model_name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise PipelineError(
            f"timm has no pretrained weights for '{model_name}'. Use a tagged name that has them "
            f"(`timm.list_pretrained('{model_name.split('.')[0]}*')`), model.weights=random, or "
            f"model.weights=PATH to a local checkpoint."
        )
    return cfg.tag or "default"


def ensure_available(model_name: str, choice: WeightsChoice) -> None:
    """Fetch pretrained weights into the Hugging Face cache now, in the driver, so a sweep that
    cannot have them stops before any compute (and workers sharing the cache find them there)."""
    if choice.kind != "pretrained":
        return
    import timm
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    cfg = timm.models.get_pretrained_cfg(model_name)
    try:
        if cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
                try:
                    hf_hub_download(repo_id=repo, filename=filename, revision=revision or None)
                    return
                except EntryNotFoundError:
                    continue
            raise FileNotFoundError(f"no weights file in hub repository {repo}")
        timm.models._hub.download_cached_file(cfg.url)
    except Exception as error:  # the hub client raises many types; all mean "not available here"
        raise _unavailable(model_name, error) from None


def _load_pretrained(model_name: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=True)
    except Exception as error:  # the hub client raises many types; all mean "not available here"
        raise _unavailable(model_name, error) from None


def _unavailable(model_name: str, error: Exception) -> PipelineError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
    return PipelineError(
        f"Pretrained weights for '{model_name}' could not be loaded ({type(error).__name__}: {detail}). "
        f"{'HF_HUB_OFFLINE is set and they are not in the Hugging Face cache. ' if offline else ''}"
        f"Remedies: run once where the hub is reachable so they land in the cache (HF_HOME, "
        f"default ~/.cache/huggingface) and point HF_HOME at that cache here; or download the "
        f"checkpoint and pass model.weights=/path/to/file.safetensors; or use model.weights=random "
        f"for an offline smoke run."
    )


def _checkpoint_path(model_name: str, path: Path) -> Path:
    if path.is_dir():
        for suffix in CHECKPOINT_SUFFIXES:
            candidate = path / f"{model_name}{suffix}"
            if candidate.is_file():
                return candidate
        raise PipelineError(
            f"Checkpoint directory '{path}' has no file for model '{model_name}': expected "
            f"{model_name}.safetensors (or {', '.join(CHECKPOINT_SUFFIXES[1:])}) inside it."
        )
    if not path.is_file():
        raise PipelineError(
            f"model.weights='{path}' is neither 'pretrained', 'random', 'planted' nor an existing checkpoint "
            f"file or directory. Check the path (relative paths are taken from the directory you launch in)."
        )
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise PipelineError(
            f"Checkpoint '{path}' has an unknown format; expected one of {', '.join(CHECKPOINT_SUFFIXES)}."
        )
    return path


@functools.lru_cache(maxsize=None)
def _sha256(path: str, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state_dict(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the file at ``path``, or in ``data`` (that file's bytes, already read)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load, load_file

            state = load_file(str(path)) if data is None else load(data)
        else:
            state = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise _unreadable(path, error) from None
    # Training scripts nest the weights and DataParallel prefixes names; unwrap both.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"Checkpoint '{path}' does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unreadable(path: Path, error: Exception) -> PipelineError:
    return PipelineError(
        f"Checkpoint '{path}' could not be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
        f"It may be truncated or corrupt, or (for torch files) hold pickled objects other than tensors, "
        f"which are refused for safety: re-save it as a plain state dict or as .safetensors."
    )


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes; a .safetensors file gives them from its header, without reading tensors."""
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in _read_state_dict(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k.removeprefix("module."): tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as error:
        raise _unreadable(path, error) from None


def _check_checkpoint(model_name: str, path: Path) -> None:
    """Compare names and shapes against the architecture (built on meta: no memory, no compute)."""
    if path.suffix == ".npz":
        _check_npz(model_name, path)
        return
    shapes = _checkpoint_shapes(path)
    expected = {k: tuple(v.shape) for k, v in zoo.create_architecture(model_name, "meta").state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(
        f"{k} {shapes[k]} vs {expected[k]}" for k in set(shapes) & set(expected) if shapes[k] != expected[k]
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if names:
                more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
                parts.append(f"{label}: {', '.join(names[:8])}{more}")
        raise PipelineError(
            f"Checkpoint '{path}' does not match the architecture '{model_name}' — {'; '.join(parts)}. "
            f"Check that the file was saved from this architecture (same size, patch and image size)."
        )


def _check_npz(model_name: str, path: Path) -> None:
    """A Google ViT ``.npz``: a NumPy archive of named arrays (no pickles) that timm's own loader puts
    into the architecture. The loader runs for real, into the architecture built on the meta device:
    every array it reads is read and shape-checked against its parameter, nothing is allocated."""
    import numpy as np

    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # numpy would take anything else for a pickle
            raise PipelineError(f"Checkpoint '{path}' is not a NumPy .npz archive (a zip of named arrays, as "
                                f"Google's ViT checkpoints are): it may be corrupt, or another format under an .npz "
                                f"name.")
    try:
        archive = np.load(str(path), allow_pickle=False)
    except Exception as error:
        raise _unreadable_npz(path, error) from None
    with archive:
        names = set(archive.files)
    model = zoo.create_architecture(model_name, "meta")
    if not hasattr(model, "load_pretrained"):
        raise PipelineError(f"Checkpoint '{path}' is a Google .npz checkpoint, which only original ViT models can "
                            f"load, and '{model_name}' is not one. Convert it to a state dict of this architecture "
                            f"(.safetensors or .pth).")
    blocks = len(getattr(model, "blocks", ()))
    in_file = {int(match[1]) for name in names if (match := _NPZ_BLOCK.match(name))}
    if in_file and len(in_file) != blocks:
        raise PipelineError(f"Checkpoint '{path}' does not match the architecture '{model_name}' — it has "
                            f"{len(in_file)} encoder blocks, the architecture {blocks}. Check that the file was "
                            f"saved from this architecture (same depth and width).")
    try:
        with torch.no_grad():
            model.load_pretrained(str(path))
    except KeyError as error:
        raise PipelineError(f"Checkpoint '{path}' is not a Google ViT checkpoint of '{model_name}': it lacks the "
                            f"array {error.args[0]!r}, which timm's loader reads for this architecture. Check that "
                            f"the file was saved from this architecture.") from None
    except Exception as error:
        detail = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        raise PipelineError(f"Checkpoint '{path}' does not load into the architecture '{model_name}' through timm's "
                            f"Google ViT loader ({detail}). It may be truncated or corrupt, or saved from another "
                            f"architecture (size, patch or depth).") from None


_NPZ_BLOCK = re.compile(r"(?:.*/)?Transformer/encoderblock_(\d+)/")


def _unreadable_npz(path: Path, error: Exception) -> PipelineError:
    return PipelineError(
        f"Checkpoint '{path}' could not be read as a NumPy .npz archive ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'}). It may be truncated or corrupt, or "
        f"hold pickled objects, which are refused for safety."
    )


def _read_planned(choice: WeightsChoice) -> bytes:
    """The checkpoint's bytes, read once, if they still hash to the planned id."""
    try:
        data = Path(choice.path).read_bytes()
    except OSError as error:
        raise CheckpointChanged(f"the checkpoint at {choice.path} is gone since the sweep was planned (planned "
                                f"{choice.weights_id}; {type(error).__name__}: {error.strerror or error}); "
                                f"restore it, or re-run to plan with another file") from None
    found = f"sha256-{hashlib.sha256(data).hexdigest()}"
    if found != choice.weights_id:
        raise CheckpointChanged(f"the checkpoint at {choice.path} changed since the sweep was planned: planned "
                                f"{choice.weights_id}, found {found}; re-run to plan with the new file")
    return data


def _load_file(model: nn.Module, path: Path, data: bytes) -> None:
    """Load the file from ``data``, the bytes that were hashed (so it is the planned file, whatever has
    happened to the path since); the file is in memory twice for a moment."""
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise PipelineError(f"'{path}' is a Google .npz checkpoint, which only original ViT models can load.")
        model.load_pretrained(io.BytesIO(data))
        return
    model.load_state_dict(_read_state_dict(path, data), strict=True)
