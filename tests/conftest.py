"""Shared test machinery.

* ``cuda`` marker: a test that needs a CUDA GPU; it is skipped, with the reason, when torch sees
  none (every CPU-only machine, CI included).
* Triton: on a machine without a GPU, ``TRITON_INTERPRET=1`` is set so that the Triton kernels
  run (slowly, on small shapes) in Triton's interpreter.
* pytest-xdist (the README's ``-n 3``): each worker's torch, and what it starts, gets its share
  of the cores; the longest files are handed out first (``LONGEST_FIRST``).
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


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist (the README's ``-n 3``) each worker gets its share of the cores for
    torch's thread pool (at least one thread), and so do the processes it starts (ranks,
    commands): a pool per worker as wide as the machine would spin against the other workers' and
    slow them all. An explicit ``OMP_NUM_THREADS`` is kept. (Three workers even on two cores: a
    large part of the suite waits -- interpreters starting, a stopped peer's timeout, a server
    coming up -- and a third worker computes meanwhile.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


_share_the_cores_among_workers()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped when torch sees none")


# The files that take longest, longest first. The README runs the suite on three pytest-xdist
# workers that take one file at a time (``--dist loadfile --no-loadscope-reorder`` in
# pyproject.toml: a file's module fixtures and shared worlds stay in one process), in collection
# order: these go first, so that no long file starts last while the other workers have nothing left
# to do. The other files follow in pytest's order. Only the order changes, never what runs.
LONGEST_FIRST = (
    # the compile tests: single processes whose tracing slows most beside the others
    "test_compile_inductor.py",
    "test_compile.py",
    "test_compile_ranks.py",
    "test_compile_graphs.py",
    # then by their measured time on three workers, longest first
    "test_cli.py",
    "test_bench.py",
    "test_pipeline_variants.py",
    "test_patch_unet.py",
    "test_compressed_fresh_exchange.py",
    "test_compressed_exchange.py",
    "test_serve.py",
    "test_comfyui_node.py",
    "test_fidelity.py",
    "test_trained_model.py",
    "test_pipelines.py",
    "test_compile_targets.py",
    "test_failures.py",
    "test_triton_group_norm.py",
    "test_launcher.py",
    "test_exact_mode.py",
    "test_agreement.py",
    "test_engine.py",
    "test_triton_halo_conv.py",
    "test_application.py",
)


def pytest_collection_modifyitems(config, items):
    place = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(place)))  # stable: files stay whole
    if _cuda_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def run_ranks():
    return run_on_ranks
