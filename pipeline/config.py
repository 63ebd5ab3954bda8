"""The typed schemas behind conf/: Hydra checks every override against them.

The YAML files under conf/ hold the values (the paper's settings, the cluster
presets, the experiments); these dataclasses hold the types, so a malformed
override (``optim.steps=abc``, an unknown key) fails in Hydra before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SweepSection:
    models: list[str] = field(default_factory=lambda: ["deit_tiny_patch16_224"])
    layers: Any = "all"  # all | first:N | last:N | A-B | N | [N, ...]
    features: Any = "first:8"  # the same forms, per layer
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, Any] = field(default_factory=dict)  # optim.*/target.*/model.* key -> list of values
    variants: Any = field(default_factory=list)  # list of {key: value} overrides, each a part of the sweep
    chunk_size: int = 8  # features of one layer optimized together in one batch


@dataclass
class ModelSection:
    weights: str = "random"  # pretrained | random | planted | PATH (file or directory)
    init_seed: int = 0
    img_size: Optional[int] = None  # input side in pixels; null: the architecture's native size
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class TargetSection:
    kind: str = "mlp"  # mlp | keys | queries | values | attn_out
    objective: str = "mean"  # mean | position-ROW-COL


@dataclass
class OptimSection:
    steps: int = 400
    lr: Any = "auto"  # auto: pixel 1.0 for CLIP, 0.1 otherwise (the paper's); fourier 0.05; maco 1.0
    beta1: float = 0.5
    beta2: float = 0.99
    eps: float = 1e-8
    tv: float = 1.0
    tv_scale: float = 0.0005
    copies: int = 8
    jitter: int = 32
    colour_shift: str = "code"
    noise: str = "code"
    noise_std: float = 0.5
    precision: str = "fp32"
    trace_points: int = 20
    objective_scale: str = "code"
    param: str = "pixel"  # pixel | fourier | maco (pipeline/parameterizations.py)
    fourier_decay: float = 1.0
    fourier_sd: float = 0.01
    fourier_decorrelate: bool = True
    maco_spectrum: str = "powerlaw"  # powerlaw | PATH to a .npy/.safetensors magnitude spectrum
    maco_alpha: float = 1.0


@dataclass
class StoreSection:
    root: str = "outputs/store"
    commit_every: int = 64
    commit_seconds: float = 120.0


@dataclass
class ClusterSection:
    kind: str = "local"  # local: start a Ray sized to this machine | ray: join RAY_ADDRESS / address
    address: Optional[str] = None
    workers: Any = "auto"  # auto: as many as the resources allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: Any = "auto"  # auto: 1 where Ray sees GPUs, else 0; 0.25 packs four workers on a GPU
    gpu_wait_s: float = 300.0  # how long GPUs asked for but absent are waited for (an autoscaler), then stop
    max_in_flight: Any = "auto"  # chunks submitted but not finished; auto: 2 per worker
    max_failures: int = 100
    model_cache: int = 2  # models a worker keeps loaded


@dataclass
class ProgressSection:
    log_every_s: float = 30.0
    bar: bool = True


@dataclass
class SweepConfig:
    sweep: SweepSection = field(default_factory=SweepSection)
    model: ModelSection = field(default_factory=ModelSection)
    target: TargetSection = field(default_factory=TargetSection)
    optim: OptimSection = field(default_factory=OptimSection)
    store: StoreSection = field(default_factory=StoreSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    progress: ProgressSection = field(default_factory=ProgressSection)


@dataclass
class StoreRoot:
    root: str = "outputs/store"


@dataclass
class ImagesSection:
    path: Optional[str] = None  # ImageFolder root, a WebDataset .tar, a directory of tars or a tar pattern
    boxes: Optional[str] = None  # ImageNet XML directory or image_id,xmin,ymin,xmax,ymax[,label] CSV
    limit: Optional[int] = None  # keep this many images, evenly spaced over the set


@dataclass
class ExamplesConfig:
    store: StoreRoot = field(default_factory=StoreRoot)
    images: Optional[str] = None  # ImageFolder root, WebDataset .tar, directory of tars or tar pattern
    limit: Optional[int] = None
    k: int = 9
    slice_size: int = 512  # images per unit of work
    batch_size: int = 32
    thumbnail: int = 64  # thumbnail side in pixels
    weights: Optional[str] = None  # a checkpoint path for visualizations made from a file that has moved
    device: str = "auto"
    cluster: ClusterSection = field(default_factory=ClusterSection)
    progress: ProgressSection = field(default_factory=ProgressSection)


@dataclass
class TokensParams:
    isolate: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 5, 6, 9, 10, 11, 12])
    drop: list[int] = field(default_factory=list)  # drop patch tokens after block l
    pooling: list[str] = field(default_factory=lambda: ["mean", "max"])
    tokens: list[Any] = field(default_factory=lambda: ["random"])  # patch index or "random"


@dataclass
class FrequencyParams:
    kinds: list[str] = field(default_factory=lambda: ["lowpass", "highpass"])
    filters: list[str] = field(default_factory=lambda: ["ideal", "gaussian"])
    radii: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0, 32.0, 64.0, 112.0])


@dataclass
class SpatialParams:
    layers: Any = "all"
    features: Any = "all"


@dataclass
class ProbeSection:
    name: str = "tokens"  # tokens | fgbg | frequency | spatial
    models: list[str] = field(default_factory=lambda: ["deit_tiny_patch16_224"])
    weights: str = "pretrained"  # pretrained | random | PATH (file, or directory with <model>.<ext>)
    init_seed: int = 0
    tokens: TokensParams = field(default_factory=TokensParams)
    frequency: FrequencyParams = field(default_factory=FrequencyParams)
    spatial: SpatialParams = field(default_factory=SpatialParams)


@dataclass
class ProbesConfig:
    probe: ProbeSection = field(default_factory=ProbeSection)
    images: ImagesSection = field(default_factory=ImagesSection)
    store: StoreRoot = field(default_factory=StoreRoot)
    slice_size: int = 500
    batch_size: int = 32
    device: str = "auto"
    cluster: ClusterSection = field(default_factory=ClusterSection)
    progress: ProgressSection = field(default_factory=ProgressSection)


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="sweep_schema", node=SweepConfig)
    store.store(name="examples_schema", node=ExamplesConfig)
    store.store(name="probes_schema", node=ProbesConfig)
