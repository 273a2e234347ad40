"""Shared fixtures.

``TRITON_INTERPRET=1`` for the whole session, before anything imports ``triton`` (DeepSpeed does, on import): the
interpreter is chosen when ``triton.language`` is first imported, and the kernel tests (``tests/unit/test_kernels.py``)
run the Triton kernels in it on CPU. Nothing else changes: ``model.kernels=auto`` runs the reference on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def single_process():
    from chimera.parallel import topology

    return topology.initialize(1, 1)


@pytest.fixture
def run_here():
    """``helpers.run_chimera_here``: ``run_here("export", ...)`` runs the CLI in this process (for refusals and other
    single-process commands that leave no global state behind)."""
    from helpers import run_chimera_here

    return run_chimera_here


@pytest.fixture(scope="module")
def tp2_runs(request, tmp_path_factory):
    """The test module's ``PRESETS`` trained at TP=2, all in one process group
    (``helpers.train_with_tensor_parallelism``): the directory that holds a run directory per preset."""
    from helpers import train_with_tensor_parallelism

    return train_with_tensor_parallelism(tmp_path_factory.mktemp("tp2"), request.module.PRESETS)
