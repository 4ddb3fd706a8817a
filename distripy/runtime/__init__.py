"""The Python face of distripy's communication layer.

* ``Comm`` / ``Work``: the protocol the patch-parallel modules use (``distripy.runtime.comm``);
* ``TorchComm``: its torch.distributed implementation (``distripy.runtime.torch_comm``);
* ``NcclComm``: its implementation on the C++ runtime (``distripy.runtime.nccl_comm``; CUDA);
* ``LoopbackComm``: one process standing in for one rank of N, every transfer complete at once
  (``distripy.runtime.loopback_comm``): one device measures one rank's compute; its
  ``TrafficLog`` records what a rank sends, and where in the step;
* ``ThreadedWorld`` / ``ThreadedComm``: N ranks as threads of one process (an in-process
  executor's ranks; ``distripy.runtime.threaded_comm``);
* ``native()``: the C++/NCCL runtime ``distripy._C``; when it is absent (installed with
  ``DISTRIPY_SKIP_EXT=1``, or its shared libraries cannot be loaded) it raises
  ``NativeRuntimeUnavailable`` with the reason and the remedy;
* ``factory``: which comm a ``DistriConfig`` asks for, the refusal of a backend this machine
  cannot run, and the world and patch-group comms of a parallel model;
* ``distributed.init``: torch.distributed from torchrun's environment (``distripy.init``).

Importing this package does not import torch; ``TorchComm`` and ``NcclComm`` do, on first use.
"""

from distripy.runtime.comm import Comm, CompletedWork, Work
from distripy.runtime.loopback_comm import LoopbackComm, TrafficLog, Transfer
from distripy.runtime.threaded_comm import ThreadedComm, ThreadedWorld
from distripy.runtime.loader import (
    NativeRuntimeUnavailable,
    native,
    native_available,
    native_unavailable_reason,
)

__all__ = [
    "Comm",
    "CompletedWork",
    "LoopbackComm",
    "NativeRuntimeUnavailable",
    "NcclComm",
    "ThreadedComm",
    "ThreadedWorld",
    "TorchComm",
    "TrafficLog",
    "Transfer",
    "Work",
    "native",
    "native_available",
    "native_unavailable_reason",
]


def __getattr__(name):
    if name == "TorchComm":
        from distripy.runtime.torch_comm import TorchComm

        return TorchComm
    if name == "NcclComm":
        from distripy.runtime.nccl_comm import NcclComm

        return NcclComm
    raise AttributeError(f"module 'distripy.runtime' has no attribute {name!r}")
