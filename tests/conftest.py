"""Shared test fixtures: isolated directories, the sweep's config composer, one Ray per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
# Subprocesses (`python -m pipeline sweep ...` from a temporary directory) import this checkout's
# pipeline, not whichever checkout is installed in editable mode.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO, *filter(None, [os.environ.get("PYTHONPATH")])])

import pipeline  # noqa: E402,F401  (installs the torchvision shim before timm is imported)


@pytest.fixture
def compose():
    """The typed sweep config (pipeline.config.SweepConfig) the command would hand over, from override strings."""
    from pipeline import cli

    def _compose(*overrides: str):
        return cli.load("sweep", *overrides)

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
