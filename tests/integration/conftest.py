"""Fixtures of the Ray integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs on 127.0.0.1 (no dashboard), with a study's job environment, per test
    module."""
    import ray

    from sage_dist.tune.cluster import JOB_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": JOB_ENV})
    yield
    ray.shutdown()
