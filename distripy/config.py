"""``DistriConfig``: how a model is made patch-parallel.

Rank and world size are not configured: they come from torch.distributed (``distripy.init()``
sets it up from torchrun's environment), so one script runs unchanged on 1, 2 or 8 GPUs.
"""

from dataclasses import dataclass

from distripy.errors import ConfigError

__all__ = [
    "COMM_BACKENDS",
    "DEFAULT_MODE",
    "DEFAULT_TIMEOUT_S",
    "DistriConfig",
    "KERNEL_BACKENDS",
    "MODES",
    "PROCESS_GROUP_TIMEOUT_S",
]

MODES = ("corrected_async_gn", "full_sync", "sync_gn", "stale_gn", "naive_patch")
"""
* ``corrected_async_gn`` (default, DistriFusion's): after warm-up, halos and attention K/V from
  the previous step; GroupNorm statistics corrected with this step's local ones;
* ``full_sync``: every exchange fresh every step: equals the single-device result;
* ``sync_gn``: stale halos and K/V, fresh (synchronous) GroupNorm statistics;
* ``stale_gn``: stale halos, K/V and GroupNorm statistics;
* ``naive_patch``: no exchange at all, every band alone (the baseline that shows seams).
"""

DEFAULT_MODE = "corrected_async_gn"

COMM_BACKENDS = ("auto", "nccl", "torch")
"""``nccl``: the C++ runtime ``distripy._C``; ``torch``: torch.distributed; ``auto``: ``torch``, or
``nccl`` with ``use_cuda_graph`` (see ``distripy.runtime.factory``)."""

KERNEL_BACKENDS = ("auto", "triton", "torch")
"""``torch``: the references; ``triton``: the Triton kernels (CUDA); ``auto``: per call, by the
tensors' device (see ``distripy.kernels``)."""

DEFAULT_TIMEOUT_S = 300.0
"""The longest any wait for a transfer may take before it raises (``DistriConfig.timeout_s`` and
every ``Comm``'s default)."""

PROCESS_GROUP_TIMEOUT_S = 600.0
"""torch.distributed's own timeout for the process group ``distripy.init`` creates."""


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"DistriConfig.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class DistriConfig:
    """Settings of displaced patch parallelism.

    ``warmup_steps``: the first steps of every generation exchange fresh activations
    synchronously (at least the first step always does: there is nothing stale yet).
    ``split_batch``: with an even batch (classifier-free guidance's (uncond, cond) halves) and an
    even number of ranks, each half of the ranks denoises one half of the batch.
    ``comm_backend``: ``nccl`` (the C++ runtime), ``torch`` (torch.distributed) or ``auto``.
    ``kernel_backend``: ``triton`` (the Triton kernels, CUDA), ``torch`` (the references) or
    ``auto`` (on CUDA the Triton GroupNorm kernels and, per convolution shape, the faster of the
    fused Triton halo convolution and a halo-padded buffer + cuDNN; on CPU the references).
    ``timeout_s``: the longest any wait for a transfer may take before it raises.
    ``use_cuda_graph``: run each UNet step as a replayed CUDA graph (CUDA; with the C++ runtime,
    ``comm_backend='nccl'`` or ``'auto'``, or a ``LoopbackComm``): one graph per input shape and
    step kind (synchronous warm-up, asynchronous) and step parity, captured the second time that
    kind of step is met and replayed from then on, across generations of the same shape. It
    removes the per-step launch cost of the UNet's ~thousand small kernels, which is what limits
    small bands (1024², 8 GPUs); the result equals eager execution.

    Frozen: a parallelised model reads it on every step; ``dataclasses.replace`` makes a changed
    copy for the next ``parallelize``.
    """

    warmup_steps: int = 4
    mode: str = DEFAULT_MODE
    split_batch: bool = True
    comm_backend: str = "auto"
    kernel_backend: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S
    use_cuda_graph: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ConfigError(f"DistriConfig.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        _check_choice("mode", self.mode, MODES)
        if not isinstance(self.split_batch, bool):
            raise ConfigError(f"DistriConfig.split_batch={self.split_batch!r} must be True or False")
        _check_choice("comm_backend", self.comm_backend, COMM_BACKENDS)
        _check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        if not isinstance(self.use_cuda_graph, bool):
            raise ConfigError(f"DistriConfig.use_cuda_graph={self.use_cuda_graph!r} must be True or False")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not self.timeout_s > 0
        ):
            raise ConfigError(
                f"DistriConfig.timeout_s={self.timeout_s!r} must be a positive number of seconds"
            )

    @property
    def rank(self) -> int:
        """This process's rank in torch.distributed's world (0 when it is not initialised)."""
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        """The number of ranks in torch.distributed's world (1 when it is not initialised)."""
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
