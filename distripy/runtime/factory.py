"""Choosing the communication backend and building the communicators of a parallel model.

One place decides which ``Comm`` a ``DistriConfig`` asks for, refuses before any work a backend
this machine or build cannot run, and makes the comm of all ranks plus, for CFG split, the comm
of this rank's patch group:

* ``resolve_defaults`` makes a config's automatic choices for a model on or off CUDA;
* ``comm_backend='nccl'``, or ``'auto'`` with ``use_cuda_graph``: ``NcclComm`` (the C++ runtime,
  whose transfers join CUDA-graph captures); otherwise ``TorchComm`` (torch.distributed: gloo on
  CPU, NCCL on GPUs);
* a patch group is a ``subgroup`` of the world comm, so a comm the caller passes in (e.g. a
  ``LoopbackComm``) gets its patch groups the same way as one built here;
* ranks that are threads of one process (``application.ThreadedExecutor``): ``thread_rank_comm``
  gives each its comm on its device from the threads' own ``ThreadedComm``.
"""

import dataclasses
from typing import Dict

from distripy.config import DistriConfig
from distripy.errors import ConfigError, InputTypeError
from distripy.runtime.comm import capturable
from distripy.runtime.loader import native_available, native_unavailable_reason

__all__ = [
    "alone_comm",
    "check_backends",
    "comm_class",
    "make_comms",
    "make_world_comm",
    "on_cuda",
    "patch_group_ranks",
    "resolve_defaults",
    "thread_rank_comm",
    "uses_native_runtime",
]


def on_cuda(model) -> bool:
    """Whether ``model``'s parameters are on a CUDA device (where ``parallelize`` finds it)."""
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type == "cuda"


def resolve_defaults(config: DistriConfig, comm=None, cuda_model: bool = False) -> DistriConfig:
    """``config`` with its automatic choices made, for a model that is (``cuda_model``) or is not
    on a CUDA device. A rank's eager step is bound by the host's launches of the UNet's many small
    kernels, and a step replayed from a CUDA graph equals it without them (the measurement:
    docs/results.md). So:

    * ``use_cuda_graph=None`` -> on for a CUDA model whose comm can join a capture (the C++
      runtime, or a given comm with ``supports_cuda_graphs``), off otherwise;
    * ``comm_backend='auto'`` -> ``'nccl'`` (the C++ runtime) for a CUDA model when
      ``distripy._C`` loads, or when CUDA graphs are asked for explicitly; else ``'torch'``.

    Explicit values are kept (and checked by ``check_backends``)."""
    import torch

    cuda = cuda_model and torch.cuda.is_available()
    backend = config.comm_backend
    if backend == "auto":
        backend = "nccl" if config.use_cuda_graph is True or (cuda and native_available()) else "torch"
    graphs = config.use_cuda_graph
    if graphs is None:
        can_capture = capturable(comm) if comm is not None else backend == "nccl"
        graphs = bool(cuda and can_capture)
    return dataclasses.replace(config, comm_backend=backend, use_cuda_graph=graphs)


def uses_native_runtime(config: DistriConfig) -> bool:
    """The C++ runtime: asked for, or ``auto`` with CUDA graphs (which torch.distributed's transfers
    cannot join here)."""
    return config.comm_backend == "nccl" or (config.comm_backend == "auto" and config.use_cuda_graph)


def check_backends(config: DistriConfig, comm=None) -> None:
    """Refuse, before any work, a backend this machine or build cannot run (``comm``: a comm the
    caller provides instead of one built from ``config.comm_backend``)."""
    import torch

    cuda = torch.cuda.is_available()
    if comm is None and uses_native_runtime(config):
        what = "comm_backend='nccl'" if config.comm_backend == "nccl" else "use_cuda_graph=True"
        if not cuda:
            raise ConfigError(f"DistriConfig.{what} needs CUDA GPUs; torch sees none")
        if not native_available():
            raise ConfigError(f"DistriConfig.{what} needs distripy._C: {native_unavailable_reason()}")
    if config.use_cuda_graph:
        if not cuda:
            raise ConfigError("DistriConfig.use_cuda_graph=True needs CUDA GPUs; torch sees none")
        if comm is None and config.comm_backend == "torch":
            raise ConfigError(
                "DistriConfig.use_cuda_graph=True needs the C++ runtime (comm_backend 'nccl' or 'auto'): "
                "torch.distributed's transfers are not captured into CUDA graphs here"
            )
        if comm is not None and not capturable(comm):
            raise ConfigError(
                f"DistriConfig.use_cuda_graph=True: the given {type(comm).__name__} cannot be captured "
                "into a CUDA graph (use NcclComm or LoopbackComm)"
            )
    if config.kernel_backend == "triton" and not cuda:
        raise ConfigError(
            "DistriConfig.kernel_backend='triton' needs CUDA GPUs; torch sees none (use 'torch' or 'auto')"
        )


def comm_class(config: DistriConfig) -> type:
    """The ``Comm`` class ``config`` asks for (``NcclComm`` or ``TorchComm``)."""
    if uses_native_runtime(config):
        from distripy.runtime.nccl_comm import NcclComm

        return NcclComm
    from distripy.runtime.torch_comm import TorchComm

    return TorchComm


def make_world_comm(config: DistriConfig):
    """A comm of all ranks of torch.distributed's world, of the class ``config`` asks for (every
    rank calls this together)."""
    return comm_class(config)(None, config.timeout_s)


def alone_comm(timeout_s: float):
    """The comm of a rank that runs a generation by itself (``distripy.alone``): a one-rank
    loopback, through which every exchange is this rank's own data."""
    from distripy.runtime.loopback_comm import LoopbackComm

    return LoopbackComm(0, 1, timeout_s)


def patch_group_ranks(rank: int, world_size: int) -> range:
    """With CFG split: the ranks of ``rank``'s half of the world (the first half denoises the first
    half of the batch)."""
    half = world_size // 2
    first = rank // half * half
    return range(first, first + half)


def make_comms(config: DistriConfig, comm=None):
    """``(world, patch)``: the comm of all ranks (``comm``, or one built from ``config`` over
    torch.distributed's world) and, keyed by whether the batch is split, the comm of this rank's
    patch group. Every rank must call this together (the split is collective)."""
    world = comm if comm is not None else make_world_comm(config)
    patch: Dict[bool, object] = {False: world}
    if config.split_batch and world.world_size % 2 == 0:
        if not hasattr(world, "subgroup"):
            raise InputTypeError(
                f"parallelize: split_batch needs the given {type(world).__name__} to provide "
                "subgroup(ranks); or set DistriConfig(split_batch=False)"
            )
        patch[True] = world.subgroup(patch_group_ranks(world.rank, world.world_size))
    return world, patch


def thread_rank_comm(host, device, timeout_s: float):
    """The comm of a rank that is a thread of this process, on ``device`` (a ``torch.device``):
    ``host`` itself (its ``ThreadedComm``) on the CPU; on a GPU the C++ runtime's communicator,
    bootstrapped through ``host`` (every rank's thread calls this at once: NCCL's initialisation
    waits for all of them)."""
    if device.type == "cpu":
        return host
    if not native_available():
        raise ConfigError(f"ranks on GPUs in one process need the C++ runtime: {native_unavailable_reason()}")
    from distripy.runtime.nccl_comm import NcclComm

    return NcclComm(None, timeout_s, device.index, host=host)
