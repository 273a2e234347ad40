"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def single_process():
    from chimera.parallel import topology

    return topology.initialize(1, 1)
