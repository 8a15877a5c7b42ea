"""Fixtures of the GRPO-loop tests: the module's Ray session, actor processes kept from one run to
the next, and a per-test model cache."""

import pytest
import ray

from orchestration.actors import Actors


@pytest.fixture(scope="module")
def ray_session():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def kept_actors():
    """Actor processes kept from one run of this module to the next, as a sweep keeps them
    (orchestration.actors.Actors), for the runs that do not test start-up or a restart with a run's
    own arguments: each skips ~15 s of process start and imports. A run that needs its own
    processes closes these first (on 2 CPUs their placement group would leave it none)."""
    kept = Actors()
    yield kept
    kept.close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLACCEL_CACHE", str(tmp_path / "cache"))
