"""Shared test machinery.

* ``cuda`` marker: a test that needs a CUDA GPU; it is skipped, with the reason, when torch sees
  none (every CPU-only machine, CI included).
* ``run_ranks`` fixture: ``run_ranks(fn, world_size, *args, timeout=..., **kwargs)`` runs
  ``fn(rank, world_size, *args, **kwargs)`` on that many real processes joined by a gloo process
  group and returns the per-rank results (see ``multirank.py``).
"""

import pytest

from multirank import run_on_ranks

pytest_plugins = ["pytester"]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped when torch sees none")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def run_ranks():
    return run_on_ranks
