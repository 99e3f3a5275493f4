"""A local Ray cluster for the tests that run real workers in-process."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from workers.pool import connect

    connect(None, num_cpus=2)
    yield
    ray.shutdown()
