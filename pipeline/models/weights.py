"""Weights for a zoo architecture: pretrained (timm hub), seeded random, planted, or a local file.

``model.weights`` takes one of:
- ``pretrained``: timm's default (or the name's ``.tag``) weights from the Hugging Face hub,
  honouring an existing cache and HF_HUB_OFFLINE;
- ``random``: timm's own init under ``torch.manual_seed(model.init_seed)``;
- ``planted``: seeded random weights with units wired to prefer known stimuli (pipeline.models.planted);
- a path: a ``.safetensors`` file, a torch state-dict file (loaded with weights_only=True),
  an original Google ViT ``.npz`` (through timm's own loader), an ONNX export of a transformers
  ViT/DeiT/DINOv2 (``.onnx``, pipeline.models.onnx_import; verified against onnxruntime before
  any sweep uses it), or a directory that holds ``<model name>.safetensors`` (or another of
  those suffixes) per model, for sweeps over several models.

A model built at another input size (``model.img_size``) gets the checkpoint's absolute position
embeddings resampled to its grid (bicubic, prefix tokens kept, as timm and transformers do).

Every record carries a weights id: ``random-<seed>``, ``pretrained-<tag>@<revision>``,
``planted-<version>-<seed>`` or ``sha256-<hex of the file>``, parsed and written by
:class:`pipeline.models.weights_id.WeightsId`. :func:`resolve` validates a choice and computes its id
cheaply, before any compute; :func:`load` builds the model. A file is checked at plan time
against the architecture (names and shapes; an ``.npz`` goes through timm's loader into the
architecture built on the meta device) and, when a worker loads it later, against the planned
hash: the worker reads the file once, hashes those bytes and loads from them, so a file
replaced in between fails its units (:class:`PlannedFileChanged`) instead of being recorded
under the old hash. Other files a sweep is planned with (target.directions) are read the same way
(:func:`file_id`, :func:`read_planned`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models import clean_state_dict
from torch import nn

from pipeline.models import zoo
from pipeline.models.mismatch import describe_mismatch
from pipeline.models.positions import fit_position_embedding
from pipeline.models.weights_id import REVISION, WeightsId
from pipeline.errors import PipelineError

HUB_PROBE_TIMEOUT_S = 3.0
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".onnx")


class PlannedFileChanged(PipelineError):
    """The file at a planned path (a checkpoint, a directions file) is not the one the sweep was planned with."""


@dataclass(frozen=True)
class WeightsChoice:
    kind: str  # random | pretrained | planted | file
    weights_id: str
    path: str | None = None
    init_seed: int = 0
    img_size: int | None = None  # the input size the model is built at; None: its native size


def resolve(model_name: str, weights: str, init_seed: int = 0, img_size: int | None = None,
            pin: bool = True, plain_timm: bool = False) -> WeightsChoice:
    """Validate ``weights`` for ``model_name`` (built at ``img_size``, or natively) without building the
    model; raise a clear error otherwise.

    Pretrained weights are pinned: fetched into the cache (or found there) and named by the bytes found,
    ``pretrained-<tag>@<hub revision>`` (``@sha256-<hex>`` for a file timm downloads from a URL), so two caches
    holding different revisions of one tag make different units. ``pin=False`` reads no weights and names the
    tag alone, as ids did before they carried the revision: for looking at a plan, never for writing one.

    ``plain_timm`` also takes a timm architecture outside the zoo, built at its native size: the probes'
    classifiers (CNNs among them), which need no traced layout. Its weights get the same checks."""
    if plain_timm and not zoo.in_zoo(model_name):
        _check_plain(model_name, img_size)
    else:
        zoo.family_of(model_name)
        if img_size == zoo.native_size(model_name):
            img_size = None  # one identity, and one unit key, per model and size
        zoo.layout(model_name, img_size)  # refuses sizes the architecture cannot take
    if weights == "random":
        return WeightsChoice("random", str(WeightsId("random", seed=init_seed)), init_seed=init_seed,
                             img_size=img_size)
    if weights == "planted":
        from pipeline.models import planted

        planted.planted_units(model_name)  # raises for models without a planted construction
        return WeightsChoice("planted", str(WeightsId("planted", seed=init_seed, version=planted.PLANTED_VERSION)),
                             init_seed=init_seed, img_size=img_size)
    if weights == "pretrained":
        tag = _pretrained_tag(model_name)
        if not pin:
            return WeightsChoice("pretrained", str(WeightsId("pretrained", tag=tag)), img_size=img_size)
        source = ensure_pretrained(model_name)
        return WeightsChoice("pretrained", str(WeightsId("pretrained", tag=tag, revision=source)), path=source,
                             img_size=img_size)
    path = _checkpoint_path(model_name, Path(weights).expanduser())
    _check_checkpoint(model_name, path, img_size)
    return WeightsChoice("file", file_id(path), path=str(path), img_size=img_size)


def _check_plain(model_name: str, img_size: int | None) -> None:
    import timm

    if not timm.is_model(model_name.partition(".")[0]):
        raise PipelineError(f"Unknown model '{model_name}': it is neither a supported ViT (`vit-atlas zoo`) nor a "
                            f"timm architecture (e.g. resnet50, mobilenetv2_100, densenet121).")
    zoo.check_tag(model_name)
    if img_size is not None:
        raise PipelineError(f"'{model_name}' is not a zoo ViT, so it is built at its native input size only; "
                            f"leave the image size unset.")


def _architecture(model_name: str, device: torch.device | str = "cpu", img_size: int | None = None) -> nn.Module:
    """The zoo's architecture, or the plain timm one of a model outside the zoo (``resolve(plain_timm=True)``)."""
    if zoo.in_zoo(model_name):
        return zoo.create_architecture(model_name, device, img_size)
    import timm

    with torch.device(device):
        return timm.create_model(model_name, pretrained=False).eval()


def choice_of_record(model_name: str, weights_id: str, recorded: str, image_size: int,
                     override: str | None = None) -> WeightsChoice:
    """The weights a record was made with, from its ``weights`` id, the ``model.weights`` its config
    recorded and its image size; ``override`` points at a checkpoint file that has moved since."""
    parsed = WeightsId.parse(weights_id)
    if parsed.kind == "pretrained" and image_size == zoo.native_size(model_name):
        image_size = None
    if parsed.kind == "pretrained" and parsed.revision:
        # The revision the record names, loaded as such (from the cache, or the hub), whatever the tag's newest.
        return WeightsChoice("pretrained", weights_id, path=parsed.revision, img_size=image_size)
    if parsed.kind == "pretrained":
        # Records from before ids carried the revision: whichever revision is here, as they were made.
        return dataclasses.replace(resolve(model_name, "pretrained", img_size=image_size), weights_id=weights_id)
    if parsed.kind in ("random", "planted"):
        choice = resolve(model_name, parsed.kind, parsed.seed, image_size)
    else:
        recorded = override or recorded
        try:
            choice = resolve(model_name, recorded, img_size=image_size)
        except PipelineError as error:
            raise PipelineError(
                f"The visualizations of '{model_name}' were made with weights {weights_id} from '{recorded}', "
                f"which cannot be loaded here: {error} Pass weights=PATH (the checkpoint file or a directory of "
                f"<model>.safetensors files) to point at the same weights."
            ) from None
    if choice.weights_id != weights_id:
        raise PipelineError(
            f"The visualizations of '{model_name}' were made with weights {weights_id}, but the weights found "
            f"('{override or 'as recorded'}') are {choice.weights_id}. Analyses must use the same weights: "
            f"pass weights=PATH to the checkpoint the sweep used."
        )
    return choice


def load(model_name: str, choice: WeightsChoice, device: torch.device | str = "cpu") -> nn.Module:
    """The model in eval mode on ``device``, parameters frozen (only the input image is optimized)."""
    if choice.kind == "pretrained":
        model = _load_pretrained(model_name, choice.img_size, choice.path)
    else:
        # Before building: a changed file fails fast.
        data = read_planned(choice.path, choice.weights_id, "checkpoint") if choice.kind == "file" else None
        torch.manual_seed(choice.init_seed)
        model = _architecture(model_name, img_size=choice.img_size)
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
    if choice.kind == "pretrained":
        ensure_pretrained(model_name)


@functools.lru_cache(maxsize=None)
def ensure_pretrained(model_name: str) -> str:
    """The same for any timm model (the probes' CNNs too); returns which bytes those are: the hub revision
    (the commit of the snapshot the file lies in) or, for weights timm downloads from a URL, ``sha256-<hex>``
    of the file. Whether the hub can be reached is asked once, in a second: its client would otherwise retry
    for a minute before failing. Once per process: a plan asks per group."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    unreachable = hub_unreachable()
    try:
        if cfg.hf_hub_id:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
                try:
                    path = Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision or None,
                                                local_files_only=unreachable is not None))
                except EntryNotFoundError:
                    continue
                # The hub's cache keeps each revision in snapshots/<commit>/: the commit names the bytes.
                if REVISION.fullmatch(path.parent.name):
                    return path.parent.name
                return file_id(path)
            raise FileNotFoundError(f"no weights file in hub repository {repo}")
        # Where timm's loader (torch.hub.load_state_dict_from_url) looks for, and puts, a URL's file.
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(cfg.url).path).name
        if not path.is_file():
            if unreachable is not None:
                raise ConnectionError(f"{cfg.url} is not in torch's hub cache ({path.parent})")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(cfg.url, str(path), progress=False)
        return file_id(path)
    except Exception as error:  # the hub client raises many types; all mean "not available here"
        raise _unavailable(model_name, error, unreachable) from None


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when it can.

    When it cannot, this process (and a local Ray's workers, which inherit its environment) read
    the cache only: HF_HUB_OFFLINE=1 spares every later download its minute of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return None
    except OSError as error:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True  # read once at import; set for this process too
        return f"the hub ({host}) cannot be reached from this machine ({type(error).__name__}: {error})"


def _load_pretrained(model_name: str, img_size: int | None, source: str | None) -> nn.Module:
    """The pretrained model, at the hub revision ``source`` names where it names one (the bytes its weights id
    stands for, on any machine), else as timm loads it."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    overlay = {}
    if source and REVISION.fullmatch(source) and cfg is not None and cfg.hf_hub_id:
        overlay = {"pretrained_cfg_overlay": {"hf_hub_id": f"{cfg.hf_hub_id.partition('@')[0]}@{source}"}}
    try:  # timm resamples the checkpoint's position embeddings to img_size itself
        return timm.create_model(model_name, pretrained=True, **({"img_size": img_size} if img_size else {}),
                                 **overlay)
    except Exception as error:  # the hub client raises many types; all mean "not available here"
        raise _unavailable(model_name, error, hub_unreachable()) from None


def _unavailable(model_name: str, error: Exception, unreachable: str | None = None) -> PipelineError:
    detail = str(error).splitlines()[0][:200] if str(error) else "no detail"
    cause = (f"{unreachable[0].upper()}{unreachable[1:]}, and they are not in the Hugging Face cache "
             f"({os.environ.get('HF_HOME', '~/.cache/huggingface')})" if unreachable else
             f"{type(error).__name__}: {detail}")
    return PipelineError(
        f"Pretrained weights for '{model_name}' could not be loaded: {cause}. "
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


def file_id(path: Path) -> str:
    """``sha256-<hex>`` of the file's bytes: how a plan names a file it was planned with (hashed once per
    process while the file's mtime stays the same)."""
    return str(WeightsId("file", digest=_sha256(str(path), path.stat().st_mtime_ns)))


def bytes_id(data: bytes) -> str:
    """:func:`file_id` of a file's bytes, already read."""
    return str(WeightsId("file", digest=hashlib.sha256(data).hexdigest()))


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
    # Training scripts nest the weights (timm's load_state_dict picks the same keys, but reads only a path).
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"Checkpoint '{path}' does not hold a state dict of tensors.")
    return clean_state_dict(state)  # names without DataParallel's ``module.`` and torch.compile's ``_orig_mod.``


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
            return clean_state_dict({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    except Exception as error:
        raise _unreadable(path, error) from None


def _check_checkpoint(model_name: str, path: Path, img_size: int | None) -> None:
    """Compare names and shapes against the architecture (built on meta: no memory, no compute)."""
    if path.suffix == ".npz":
        _check_npz(model_name, path, img_size)
        return
    architecture = _architecture(model_name, "meta", img_size)
    if path.suffix == ".onnx":
        _onnx_import().onnx_state_dict(path, architecture)  # reports what does not map, by name
        return
    shapes = _checkpoint_shapes(path)
    expected = {k: tuple(v.shape) for k, v in architecture.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(
        f"{k} {shapes[k]} vs {expected[k]}" for k in set(shapes) & set(expected)
        if shapes[k] != expected[k] and not _resamplable(k, shapes[k], expected[k])
    )
    if missing or unexpected or mismatched:
        raise PipelineError(
            f"Checkpoint '{path}' does not match the architecture '{model_name}' — "
            f"{describe_mismatch(missing, unexpected, mismatched)}. "
            f"Check that the file was saved from this architecture (same size, patch and image size)."
        )


def _check_npz(model_name: str, path: Path, img_size: int | None) -> None:
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
    model = _architecture(model_name, "meta", img_size)  # timm's loader resamples positions
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


def read_planned(path: str, planned: str, what: str) -> bytes:
    """The bytes of the ``what`` (checkpoint, directions file) at ``path``, read once, if they still hash to
    ``planned`` (its :func:`file_id` when the sweep was planned); a worker loads from these very bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise PlannedFileChanged(f"the {what} at {path} is gone since the run was planned (planned {planned}; "
                                 f"{type(error).__name__}: {error.strerror or error}); restore it, or re-run to "
                                 f"plan with another file") from None
    found = bytes_id(data)
    if found != planned:
        raise PlannedFileChanged(f"the {what} at {path} changed since the run was planned: planned {planned}, "
                                 f"found {found}; re-run to plan with the new file")
    return data


def _load_file(model: nn.Module, path: Path, data: bytes) -> None:
    """Load the file from ``data``, the bytes that were hashed (so it is the planned file, whatever has
    happened to the path since); the file is in memory twice for a moment."""
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise PipelineError(f"'{path}' is a Google .npz checkpoint, which only original ViT models can load.")
        model.load_pretrained(io.BytesIO(data))
        return
    if path.suffix == ".onnx":
        state = _onnx_import().onnx_state_dict(path, model, data).state_dict
    else:
        state = _read_state_dict(path, data)
    model.load_state_dict(fit_position_embedding(state, model), strict=True)


def _resamplable(name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Absolute position embeddings of another grid (the same prefix, the same width) are resampled."""
    return name == "pos_embed" and len(found) == len(expected) == 3 and found[-1] == expected[-1]


def ensure_verified(model_name: str, choice: WeightsChoice) -> str | None:
    """For an ONNX file: import it into the architecture at the file's input size, run the same input
    through onnxruntime and timm, and stop (one paragraph, naming the first diverging layer) beyond the
    tolerance. Returns the line to print; None for other weights. Done once per file and process."""
    if choice.kind != "file" or not choice.path.endswith(".onnx"):
        return None
    return _verify_onnx(model_name, choice.path, choice.weights_id)


@functools.lru_cache(maxsize=None)
def _verify_onnx(model_name: str, path: str, weights_id: str) -> str:
    onnx_import = _onnx_import()
    size = onnx_import.input_size(path)
    model = _architecture(model_name, "cpu", size or None)
    _load_file(model, Path(path), Path(path).read_bytes())
    report = onnx_import.verify_import(path, model)
    report.raise_if_diverged()
    worst = max(report.layer_max_abs_diff, key=report.layer_max_abs_diff.get)
    return (f"weights {path} ({weights_id[:19]}...) imported into {model_name}: final features match onnxruntime "
            f"to {report.max_abs_diff:.2g} (largest block difference {report.layer_max_abs_diff[worst]:.2g} at "
            f"{worst}; tolerance {report.atol:g} relative)")


def _onnx_import():
    from pipeline.models import onnx_import  # onnx and onnxruntime load only for ONNX weights

    return onnx_import
