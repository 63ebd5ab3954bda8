"""Shared test fixtures: isolated directories, a Hydra config composer, one Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub

import pipeline  # noqa: E402,F401  (installs the torchvision shim before timm is imported)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def compose():
    """Compose the sweep config as the CLI would, from override strings."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline import config

    config.register()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name="sweep", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every test that needs it (starting one costs seconds and ~800 MiB)."""
    import ray

    if not ray.is_initialized():
        # A Ray of its own, even while another test run's Ray is up on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def synthetic_store_root(tmp_path_factory):
    """A small store written directly (tests/synthetic_store.py): no Ray, no models. One per test module."""
    from synthetic_store import write_store

    root = tmp_path_factory.mktemp("store")
    write_store(root)
    return root
