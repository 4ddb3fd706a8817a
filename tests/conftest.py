"""Shared test machinery.

* ``cuda`` marker: a test that needs a CUDA GPU; it is skipped, with the reason, when torch sees
  none (every CPU-only machine, CI included).
* Triton: on a machine without a GPU, ``TRITON_INTERPRET=1`` is set so that the Triton kernels
  run (slowly, on small shapes) in Triton's interpreter.
* ``run_ranks`` fixture: ``run_ranks(fn, world_size, *args, timeout=..., **kwargs)`` runs
  ``fn(rank, world_size, *args, **kwargs)`` on that many real processes joined by a gloo process
  group and returns the per-rank results (see ``multirank.py``).
"""

import os

import pytest

from multirank import run_on_ranks

pytest_plugins = ["pytester"]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter. Triton decides when a kernel is
# defined, so this is set before any test module imports distripy.kernels.
if "TRITON_INTERPRET" not in os.environ and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"


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
