"""The typed schemas behind conf/: the types live here, every value lives in the YAML.

The YAML files under conf/ hold the values (the paper's settings, the cluster
presets, the experiments, each command's defaults); these dataclasses hold only
the types (no field has a default), so a malformed override (``optim.steps=abc``,
an unknown key) fails when the config is composed, before anything runs. The
commands (pipeline/cli.py) hand the stages instances of these classes
(``OmegaConf.to_object``), and an instance checks its values when it is made
(``__post_init__``), so a bad value is one paragraph naming the setting. A setting with a few
allowed values is a string :class:`enum.StrEnum` (OmegaConf 2.3 has no ``Literal``): OmegaConf checks it
when the config is composed or merged, naming the setting and the allowed values.

The config layer imports nothing of the stages: they receive these typed values and never read conf/
(:func:`paper_optim` is the paper's optimizer settings for code that runs the engine directly).

conf/ ships inside the package as ``pipeline.conf`` (pipeline/conf is a link to
the repository's top-level conf/, copied into the wheel), found at run time
through importlib.resources: :func:`conf_dir`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional, Union

from pipeline.errors import PipelineError


def conf_dir() -> Path:
    """The config tree the commands compose from: the ``pipeline.conf`` package's directory."""
    path = Path(str(importlib.resources.files("pipeline.conf")))
    if not (path / "sweep.yaml").is_file():
        raise PipelineError(f"The config directory {path} has no sweep.yaml: the installation of vit-atlas is "
                            f"incomplete; reinstall it (pip install vit-atlas, or pip install -e . in a checkout).")
    return path


def check_finite(instance: Any, prefix: str) -> None:
    """Every number in a typed config (a dataclass, its sections, their lists and mappings) is finite: the
    range checks compare with ``<``, which nan passes, and an infinite rate or duration is no setting."""
    values = ({f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
              if dataclasses.is_dataclass(instance) else instance if isinstance(instance, dict)
              else dict(enumerate(instance)) if isinstance(instance, list) else None)
    if values is None:
        if isinstance(instance, float) and not math.isfinite(instance):
            raise PipelineError(f"{prefix}={instance} is not a finite number: every numeric setting must be a "
                                "finite value in its range (`--help` lists the settings with their defaults).")
        return
    for name, value in values.items():
        check_finite(value, f"{prefix}[{name}]" if isinstance(name, int) else f"{prefix}.{name}".lstrip("."))


def _auto_or_number(value: Any, name: str, low: float, whole: bool = False, strict: bool = False) -> None:
    """``value`` is 'auto' or a number >= low (> low when strict); a PipelineError otherwise."""
    if value == "auto":
        return
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or (whole and number != int(number)) or (number <= low if strict else number < low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        kind = "a whole number" if whole else "a number"
        raise PipelineError(f"{name}={value!r} is not valid: use auto or {kind} {bound}.")


def _at_least(value: float, name: str, low: float, strict: bool = False, meaning: str = "") -> None:
    if value <= low if strict else value < low:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise PipelineError(f"{name}={value!r} is not valid: it must be {bound}{meaning}.")


@dataclass
class SweepSection:
    models: list[str]  # timm names, with or without a pretrained tag
    layers: Any  # all | first:N | last:N | A-B | N | [N, ...]
    features: Any  # the same forms, per layer
    seeds: list[int]
    grid: dict[str, Any]  # optim.*/target.*/model.* key -> list of values
    variants: Any  # list of {key: value} overrides, each a part of the sweep
    chunk_size: Union[int, str]  # features of one layer optimized together in one batch; auto: measured
    estimate: bool  # time a step on a worker and print what the sweep will take
    # Size the sweep to this many seconds of work with the cluster's workers: the first of ``sizes`` (optim
    # settings, largest first) that fits at the speed a worker measures (null: optim as given). The demo's.
    budget_s: Optional[float]
    sizes: Any  # list of {optim setting: value}, e.g. [{steps: 400}, {steps: 40, copies: 4}]

    def __post_init__(self) -> None:
        _auto_or_number(self.chunk_size, "sweep.chunk_size", 1, whole=True)
        if self.budget_s is not None:
            _at_least(self.budget_s, "sweep.budget_s", 0, strict=True, meaning=" (seconds), or null")
            if not self.sizes or not all(isinstance(size, dict) and size for size in self.sizes):
                raise PipelineError(f"sweep.sizes={self.sizes!r} must list the optimizer settings that sweep.budget_s "
                                    f"chooses from, largest first, e.g. [{{steps: 400}}, {{steps: 40}}].")


@dataclass
class ModelSection:
    weights: str  # pretrained | random | planted | PATH (file or directory)
    init_seed: int
    img_size: Optional[int]  # input side in pixels; null: the architecture's native size
    max_tokens: int  # patch tokens per image a sweep may ask for (model.img_size); bounds its memory
    device: str  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        _at_least(self.max_tokens, "model.max_tokens", 1, meaning=" (patch tokens per image)")


class TargetKind(StrEnum):
    """Where in a block a feature is read (pipeline.models.zoo.TARGETS)."""
    mlp = "mlp"
    keys = "keys"
    queries = "queries"
    values = "values"
    attn_out = "attn_out"
    residual = "residual"


@dataclass
class TargetSection:
    kind: TargetKind
    objective: str  # mean | position-ROW-COL
    directions: Optional[str]  # a .npy / .safetensors / .pt file: units are its directions, not channels


@dataclass
class StoreSection:
    root: str  # a local path or s3://... / gs://...
    commit_every: int  # records per commit
    commit_bytes: int  # or sooner, once the buffered records hold this many bytes
    commit_seconds: float  # or sooner, once the oldest buffered record waited this long
    lease_expire_s: float  # a driver silent this long has lost the store's lease to the next one

    def __post_init__(self) -> None:
        _at_least(self.commit_every, "store.commit_every", 1, meaning=" (records per commit)")
        _at_least(self.commit_bytes, "store.commit_bytes", 1,
                  meaning=" (bytes of buffered records that start a commit, e.g. 67108864 for 64 MiB)")
        _at_least(self.commit_seconds, "store.commit_seconds", 0, strict=True,
                  meaning=" (seconds a record may wait for its commit)")
        _at_least(self.lease_expire_s, "store.lease_expire_s", 0, strict=True,
                  meaning=" (seconds after a driver's last heartbeat that another may take the store over)")


class ClusterKind(StrEnum):
    local = "local"  # start a Ray sized to this machine
    ray = "ray"  # join RAY_ADDRESS / cluster.address


@dataclass
class ClusterSection:
    kind: ClusterKind
    address: Optional[str]
    workers: Union[int, str]  # auto: as many as the resources allow
    cpus_per_worker: float
    gpus_per_worker: Union[float, int, str]  # auto: 1 where Ray sees GPUs, else 0; 0.25 packs four on a GPU
    gpu_wait_s: float  # how long GPUs asked for but absent are waited for (an autoscaler), then stop
    max_in_flight: Union[int, str]  # chunks submitted but not finished; auto: 2 per worker
    max_failures: int  # stop once more than this many units failed (0: at the first); never negative
    model_cache: int  # models a worker keeps loaded

    def __post_init__(self) -> None:
        _auto_or_number(self.workers, "cluster.workers", 1, whole=True)
        _at_least(self.cpus_per_worker, "cluster.cpus_per_worker", 0, strict=True,
                  meaning=" (CPUs Ray reserves per worker, e.g. 1 or 0.5)")
        _auto_or_number(self.gpus_per_worker, "cluster.gpus_per_worker", 0)
        _at_least(self.gpu_wait_s, "cluster.gpu_wait_s", 0, meaning=" (seconds)")
        _auto_or_number(self.max_in_flight, "cluster.max_in_flight", 1, whole=True)
        _at_least(self.max_failures, "cluster.max_failures", 0,
                  meaning=": the run stops once more than that many units failed, 0 at the first failure; "
                          "for no limit give a number larger than the sweep")
        _at_least(self.model_cache, "cluster.model_cache", 1)


@dataclass
class ProgressSection:
    log_every_s: float  # seconds between progress lines in the log
    bar: bool  # a live bar on the terminal

    def __post_init__(self) -> None:
        _at_least(self.log_every_s, "progress.log_every_s", 0, strict=True)


class ColourShift(StrEnum):
    code = "code"  # (x - mu) / sigma, the released code's
    paper = "paper"  # sigma * x + mu, the paper's text
    none = "none"


class Noise(StrEnum):
    code = "code"  # per-copy, per-channel offset, std annealed to 0
    paper = "paper"  # per-pixel N(0, 1)
    none = "none"


class Precision(StrEnum):
    auto = "auto"  # measured on the worker (pipeline.engine.calibrate)
    fp32 = "fp32"
    bf16 = "bf16"  # autocast in the score
    fp16 = "fp16"


class ObjectiveScale(StrEnum):
    # The released code's -feats[:8, f].diag().mean(): the copies' mean divided by their number, which made TV
    # weigh 8x its stated lambda in the paper's figures.
    code = "code"
    paper = "paper"  # the text's mean over copies


# Settings whose range is not "a count >= 1": Adam's betas in [0, 1) (1 would never forget a gradient), weights
# and scales >= 0; a trace needs a point.
_OPTIM_RANGES = {"beta1": (0, "< 1"), "beta2": (0, "< 1"), "eps": (0, "> 0"), "tv": (0, ""), "tv_scale": (0, ""),
                 "noise_std": (0, ""), "trace_points": (1, "")}


@dataclass
class OptimConfig:
    """Every knob of the method (the values: conf/optim/paper.yaml, the released code's settings). A sweep's
    ``optim`` section; its ``lr`` may say ``auto``, which :meth:`for_family` resolves (the plan does, per
    model), and ``param`` holds the image parameterization's settings."""

    steps: int
    lr: Union[float, int, str]  # a number, or auto: the parameterization's rate for the model family (param.auto_lr)
    beta1: float
    beta2: float
    eps: float
    tv: float  # the paper's v; lambda = tv_scale * tv
    tv_scale: float
    copies: int  # the augmentation ensemble
    jitter: int  # max circular shift in pixels, each direction
    colour_shift: ColourShift
    noise: Noise
    noise_std: float
    precision: Precision
    trace_points: int  # how many times the objective is sampled during the run
    objective_scale: ObjectiveScale
    # The image parameterization, config group optim/param (conf/optim/param/NAME.yaml): its ``name`` (pixel, the
    # paper's | fourier | maco), its ``auto_lr`` and its own knobs. A mapping here, because its type is the
    # parameterization's own (pipeline.engine.parameterizations.settings types and checks it; the plan does, once,
    # before any compute), and the config layer imports no stage.
    param: dict[str, Any]

    def __post_init__(self) -> None:
        if self.lr != "auto":  # a float, so that lr 1 and lr 1.0 are one setting (and one config hash)
            try:
                self.lr = float(self.lr)
            except ValueError:
                raise PipelineError(f"optim.lr={self.lr!r} is neither auto nor a number.") from None
        check_finite(self, "optim")  # the range checks compare with <, which nan passes
        if self.steps < 1 or self.copies < 1 or self.jitter < 0 or (self.lr != "auto" and self.lr <= 0):
            raise PipelineError("optim.steps and optim.copies must be >= 1, optim.jitter >= 0 and optim.lr > 0.")
        for name, (low, also) in _OPTIM_RANGES.items():
            value = getattr(self, name)
            if value < low or (also == "< 1" and value >= 1) or (also == "> 0" and value <= 0):
                raise PipelineError(f"optim.{name}={value!r} is out of range: it must be >= {low}"
                                    f"{f' and {also}' if also else ''}.")

    def for_family(self, family: str | None) -> "OptimConfig":
        """This config with ``lr: auto`` replaced by the parameterization's rate for the model family
        (``param.auto_lr``: the paper's 0.1, 1.0 for CLIP, for pixels; the published rate of another)."""
        if self.lr != "auto":
            return self
        rates = self.param["auto_lr"]
        return dataclasses.replace(self, lr=float(rates.get(family, rates["default"])))

    @property
    def tv_weight(self) -> float:
        return self.tv_scale * self.tv


def param_names() -> list[str]:
    """The image parameterizations conf/optim/param/ offers."""
    return sorted(path.stem for path in (conf_dir() / "optim" / "param").glob("*.yaml"))


def param_values(param: str | Mapping[str, Any]) -> dict[str, Any]:
    """The settings of one image parameterization: conf/optim/param/NAME.yaml for a name, or for a mapping with a
    ``name``, that file with the mapping's values over it (``{name: fourier, decay: 1.5}``)."""
    from omegaconf import OmegaConf

    changes = {"name": param} if isinstance(param, str) else dict(param)
    name = changes.get("name")
    if name not in param_names():
        raise PipelineError(f"optim.param={name!r} is not an image parameterization: the parameterizations are "
                            f"{', '.join(param_names())} (conf/optim/param/).")
    return {**OmegaConf.to_container(OmegaConf.load(conf_dir() / "optim" / "param" / f"{name}.yaml")), **changes}


def paper_optim(family: str | None = None, **changes: Any) -> OptimConfig:
    """The paper's settings (conf/optim/paper.yaml and its parameterization) with ``changes``, lr resolved for
    ``family``: for code that runs the engine without a sweep (tests, benchmarks). ``param=NAME`` (or a mapping
    with its ``name`` and knobs, as :func:`param_values`) picks another parameterization."""
    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(OmegaConf.load(conf_dir() / "optim" / "paper.yaml"))
    chosen = next(entry["param"] for entry in paper.pop("defaults") if isinstance(entry, dict) and "param" in entry)
    values = {**paper, **changes, "param": param_values(changes.get("param", chosen))}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), values)).for_family(family)


def recorded_param(optim: Mapping[str, Any]) -> str:
    """The parameterization a record's ``optim`` config names: a mapping with a name since the param group,
    a bare name in records made before it."""
    param = optim["param"]
    return param["name"] if isinstance(param, Mapping) else param


@dataclass
class SweepConfig:
    sweep: SweepSection
    model: ModelSection
    target: TargetSection
    optim: OptimConfig  # lr may say auto (resolved per family by the plan)
    store: StoreSection
    cluster: ClusterSection
    progress: ProgressSection


@dataclass
class StoreRoot:
    root: str


@dataclass
class ExampleImages:
    path: Optional[str]  # ImageFolder root, a WebDataset .tar, a directory of tars or a tar pattern
    limit: Optional[int]  # keep this many images, evenly spaced over the set


@dataclass
class ImagesSection:
    path: Optional[str]  # ImageFolder root, a WebDataset .tar, a directory of tars or a tar pattern
    boxes: Optional[str]  # ImageNet XML directory or image_id,xmin,ymin,xmax,ymax[,label] CSV
    limit: Optional[int]  # keep this many images, evenly spaced over the set


@dataclass
class ExamplesConfig:
    store: StoreRoot
    images: ExampleImages
    k: int
    slice_size: int  # images per unit of work
    batch_size: int
    thumbnail: int  # thumbnail side in pixels
    weights: Optional[str]  # a checkpoint path for visualizations made from a file that has moved
    device: str
    cluster: ClusterSection
    progress: ProgressSection


@dataclass
class TokensParams:
    isolate: list[int]
    drop: list[int]  # drop patch tokens after block l
    pooling: list[str]
    tokens: list[Any]  # patch index or "random"


@dataclass
class FrequencyParams:
    kinds: list[str]
    filters: list[str]
    radii: list[float]


@dataclass
class SpatialParams:
    layers: Any
    features: Any


@dataclass
class ProbeSection:
    name: str  # tokens | fgbg | frequency | spatial
    models: list[str]
    weights: str  # pretrained | random | PATH (file, or directory with <model>.<ext>)
    init_seed: int
    tokens: TokensParams
    frequency: FrequencyParams
    spatial: SpatialParams


@dataclass
class ProbesConfig:
    probe: ProbeSection
    images: ImagesSection
    store: StoreRoot
    slice_size: int
    batch_size: int
    device: str
    cluster: ClusterSection
    progress: ProgressSection


@dataclass
class StatusConfig:
    store: StoreRoot
    verify: bool  # also read every record and check its checksums
    repair: bool  # with verify: repair what the check found


@dataclass
class DescribeConfig:
    store: StoreRoot
    weights: Optional[str]  # a checkpoint path for records made from a file that has moved
    device: str
    batch_size: int  # records measured in one forward pass


@dataclass
class SpectrumConfig:
    folder: str  # the images to average
    out: str  # OUT.npy or OUT.safetensors, written once
    size: int  # the square image side the spectrum is for (the sweep's input size)
    force: bool  # replace an existing OUT (records cite a spectrum by its sha256)


@dataclass
class AtlasConfig:
    store: StoreRoot
    out: str  # the site directory


@dataclass
class FiguresConfig:
    store: StoreRoot
    out: str  # the figures directory
    models: list[str]  # empty: every model in the store
    target: str
    per_layer: int  # progression rows per (model, weights): each layer's most activated features


@dataclass
class ZooModel:
    img_size: Optional[int]  # describe the layout at this input size (where zoo.describe supports it)


@dataclass
class ZooConfig:
    describe: list[str]  # models to describe; empty: list the supported models by family
    model: ZooModel


def schema_node(schema: type):
    """``schema`` as an OmegaConf node with every section present (typed, values missing).

    Sections without a default would be missing (``???``) nodes, and OmegaConf 2.3 fails an
    assertion when a merge fills in a missing section that has a Union field (``optim.lr``);
    materializing each section up front avoids that.
    """
    import typing

    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[field.name]):
            node[field.name] = schema_node(hints[field.name])
    return node


# `vit-atlas directions` (pipeline/analysis/directions.py): its sections, then its config.
DIRECTION_METHODS = ("pca", "topk_sae")


@dataclass
class DirectionsModel:
    name: str  # a timm architecture of the zoo
    weights: str  # pretrained | random | PATH (file), as the sweep's model.weights
    init_seed: int
    img_size: Optional[int]  # input side in pixels; null: the architecture's native size


@dataclass
class DirectionsTarget:
    kind: str  # which activations: a target of the sweep (target.kind)


@dataclass
class SaeSection:
    k: int  # latents kept per token (the top k pre-activations after the ReLU)
    steps: int  # Adam steps
    batch_size: int  # tokens per step
    lr: float

    def __post_init__(self) -> None:
        for name, low in (("k", 1), ("steps", 1), ("batch_size", 1)):
            _at_least(getattr(self, name), f"sae.{name}", low)
        _at_least(self.lr, "sae.lr", 0, strict=True)


@dataclass
class DirectionsConfig:
    store: StoreRoot
    images: ExampleImages
    model: DirectionsModel
    layer: int
    target: DirectionsTarget
    method: str  # pca | topk_sae
    n: int  # directions: principal components, or the autoencoder's latents
    seed: int
    tokens_per_image: Optional[int]  # patch tokens kept per image, drawn with the seed; null: all
    slice_size: int  # images gathered per part of the store (what a resumed job need not read again)
    batch_size: int  # images per forward
    device: str
    sae: SaeSection

    def __post_init__(self) -> None:
        if self.method not in DIRECTION_METHODS:
            raise PipelineError(f"method={self.method!r} is not a dictionary method: use one of "
                                f"{', '.join(DIRECTION_METHODS)}.")
        _at_least(self.n, "n", 1, meaning=" (directions to fit)")
        if self.tokens_per_image is not None:
            _at_least(self.tokens_per_image, "tokens_per_image", 1, meaning=", or null for every patch token")
        _at_least(self.slice_size, "slice_size", 1, meaning=" (images per part)")
        _at_least(self.batch_size, "batch_size", 1, meaning=" (images per forward)")
        if self.method == "topk_sae" and self.sae.k > self.n:
            raise PipelineError(f"sae.k={self.sae.k} is larger than n={self.n}: a top-k autoencoder keeps k of "
                                f"its n latents per token; choose sae.k <= n.")
