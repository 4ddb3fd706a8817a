"""The ``backend`` argument of the kernels: ``torch`` (the reference), ``triton`` (the Triton
kernel through its ``torch.library`` op) or ``auto`` (Triton on CUDA, the reference on CPU,
decided by the tensor's device at each call).

``meta_as_gpu()`` makes ``auto`` treat tensors on the ``meta`` device as CUDA tensors: the meta
device runs a whole model step without memory or compute, and under it each choice is the one a
GPU would make, so the ops a GPU step dispatches can be counted on a CPU machine
(``bench/kernel_count.py``)."""

import contextlib
import threading
from typing import Iterator

import torch

from distripy.config import KERNEL_BACKENDS
from distripy.errors import InputError

__all__ = ["GROUP_NORM_BACKENDS", "meta_as_gpu", "on_gpu", "use_triton"]

GROUP_NORM_BACKENDS = KERNEL_BACKENDS

_meta = threading.local()


@contextlib.contextmanager
def meta_as_gpu() -> Iterator[None]:
    """While open (in this thread), ``on_gpu`` is true for ``meta`` tensors."""
    previous = getattr(_meta, "as_gpu", False)
    _meta.as_gpu = True
    try:
        yield
    finally:
        _meta.as_gpu = previous


def on_gpu(x: torch.Tensor) -> bool:
    """Whether ``auto`` runs the GPU path for ``x``: a CUDA tensor, or a meta one in ``meta_as_gpu``."""
    return x.is_cuda or (x.is_meta and getattr(_meta, "as_gpu", False))


def use_triton(backend: str, x: torch.Tensor, op: str) -> bool:
    if backend not in GROUP_NORM_BACKENDS:
        raise InputError(f"{op}: backend={backend!r}; expected one of {GROUP_NORM_BACKENDS}")
    return backend == "triton" or (backend == "auto" and on_gpu(x))
