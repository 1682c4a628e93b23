"""Shared pytest setup: hypothesis profiles and deterministic torch state."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from flagtree.runtime import reset_cache_stats

# CI replays the same examples every run so a red build is reproducible; locally,
# hypothesis explores new inputs each time.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo cache so recompile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Kernels the tests compile go to a cache of this run, never to the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path_factory.mktemp("flagtree-cache")))
        yield


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache and zeroed cache counters for one test (modules that count cache
    hits and misses use it: `pytestmark = pytest.mark.usefixtures("fresh_cache")`)."""
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path / "cache"))
    reset_cache_stats()
