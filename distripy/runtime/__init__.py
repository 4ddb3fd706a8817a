"""The Python face of distripy's communication layer.

* ``Comm`` / ``Work``: the protocol the patch-parallel modules use (``distripy.runtime.comm``);
* ``TorchComm``: its torch.distributed implementation (``distripy.runtime.torch_comm``);
* ``native()``: the C++/NCCL runtime ``distripy._C``; when it is absent (installed with
  ``DISTRIPY_SKIP_EXT=1``, or its shared libraries cannot be loaded) it raises
  ``NativeRuntimeUnavailable`` with the reason and the remedy.

Importing this package does not import torch; ``TorchComm`` does, on first use.
"""

from distripy.runtime.comm import Comm, CompletedWork, Work
from distripy.runtime.loader import (
    NativeRuntimeUnavailable,
    native,
    native_available,
    native_unavailable_reason,
)

__all__ = [
    "Comm",
    "CompletedWork",
    "NativeRuntimeUnavailable",
    "TorchComm",
    "Work",
    "native",
    "native_available",
    "native_unavailable_reason",
]


def __getattr__(name):
    if name == "TorchComm":
        from distripy.runtime.torch_comm import TorchComm

        return TorchComm
    raise AttributeError(f"module 'distripy.runtime' has no attribute {name!r}")
