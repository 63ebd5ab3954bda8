"""Typed schemas of the analysis entry points (dataset examples, probes); values live in conf/.

As for sweeps, Hydra checks every override against these before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from pipeline.config import ClusterSection, ProgressSection


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
    store.store(name="examples_schema", node=ExamplesConfig)
    store.store(name="probes_schema", node=ProbesConfig)
