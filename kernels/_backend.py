"""The ``backend`` argument of the GroupNorm kernels: ``torch`` (the reference), ``triton`` (the
Triton kernel through its ``torch.library`` op) or ``auto`` (Triton on CUDA, the reference on
CPU, decided by the tensor's device at each call)."""

import torch

from distripy.config import KERNEL_BACKENDS
from distripy.errors import InputError

__all__ = ["GROUP_NORM_BACKENDS", "use_triton"]

GROUP_NORM_BACKENDS = KERNEL_BACKENDS


def use_triton(backend: str, x: torch.Tensor, op: str) -> bool:
    if backend not in GROUP_NORM_BACKENDS:
        raise InputError(f"{op}: backend={backend!r}; expected one of {GROUP_NORM_BACKENDS}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)
