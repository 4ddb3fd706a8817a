"""``DistriConfig``: how a model is made patch-parallel.

Rank and world size are not configured: they come from torch.distributed (``distripy.init()``
sets it up from torchrun's environment), so one script runs unchanged on 1, 2 or 8 GPUs.
"""

import os
from dataclasses import dataclass, field
from typing import Optional, Union

from distripy.errors import ConfigError

__all__ = [
    "AUTO_MODE",
    "CHECK_EVERY_STEP_VARIABLE",
    "COMM_BACKENDS",
    "COMPRESS_CHOICES",
    "EXCHANGE_CODECS",
    "DEFAULT_MODE",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WARMUP_STEPS",
    "DistriConfig",
    "HALO_CONV_BACKENDS",
    "KERNEL_BACKENDS",
    "MODE_CHOICES",
    "MODES",
]

MODES = ("corrected_async_gn", "exact", "full_sync", "sync_gn", "stale_gn", "separate_gn", "naive_patch")
"""
The modes of patch parallelism. ``exact`` computes every step as one device does, hiding each
exchange behind the compute that does not need it: the mode for few-step (distilled) models, whose
adjacent steps are too unlike for stale activations, and for whenever the image must equal one
GPU's. Its step, on every rank:

* a convolution issues its halo exchange, computes the output rows that read no halo row from the
  band alone, waits, then computes the boundary rows (into the same output);
* self-attention sends its keys and values to every other rank, one ring shift per distance,
  attends over its own at once and over each other band's as it arrives, merging the partial
  results by their log-sum-exp (``kernels.attention_merge``);
* GroupNorm all-reduces the band's statistics and waits (a few hundred bytes; nothing to overlap).

The others are displaced patch parallelism, DistriFusion's (arXiv 2402.19481) modes under its
reference implementation's names. Every one of them but ``naive_patch`` makes the first ``warmup_steps`` steps of a
generation synchronous: fresh halos, keys/values and statistics, exact. After the warm-up, with
``E(all)`` the whole image's per-(batch, group) ``[E[x], E[x^2]]``, ``E(own)`` this band's, ``t``
this step and ``t-1`` the previous one:

* ``corrected_async_gn`` (the paper's corrected asynchronous GroupNorm; what ``"auto"`` runs for
  many steps): halos and
  self-attention keys/values of the other bands from step ``t-1``;
  ``E_t(all) ~ E_{t-1}(all) + (E_t(own) - E_{t-1}(own))``, and where the variance that gives is not
  positive, the band's own fresh variance (the mean is kept);
* ``full_sync``: every exchange fresh every step, waited for where it is issued: equals the
  single-device result (``exact`` computes the same with the exchanges overlapped);
* ``sync_gn``: stale halos and keys/values; ``E_t(all)`` exchanged fresh (synchronously);
* ``stale_gn``: stale halos and keys/values; the other bands' statistics from ``t-1``, this band's
  from ``t``: ``E_t(all) ~ sum over bands b != own of w_b E_{t-1}(b) + w_own E_t(own)`` (``w_b``:
  a band's share of the image's elements);
* ``separate_gn``: stale halos and keys/values; every band normalised with its own statistics
  ``E_t(own)``;
* ``naive_patch``: no exchange at all, in any step: every band alone, its edges zero padded (the
  baseline that shows seams).
"""

AUTO_MODE = "auto"
"""Not a mode of its own: each generation runs the mode and warm-up that ``parallel.policy`` picks
from its number of steps (``exact`` for few steps, ``corrected_async_gn`` with a warm-up that is a
fraction of the steps otherwise), as measured on a trained model by ``bench/quality.py``."""

MODE_CHOICES = (AUTO_MODE,) + MODES
"""What ``DistriConfig.mode`` accepts."""

DEFAULT_MODE = AUTO_MODE

DEFAULT_WARMUP_STEPS = 5
"""Synchronous steps at the start of a generation: the reference implementation's default (its
``warmup_steps=4``, steps 0..4)."""

COMM_BACKENDS = ("auto", "nccl", "torch")
"""``nccl``: the C++ runtime ``distripy._C``; ``torch``: torch.distributed; ``auto``: ``torch``, or
``nccl`` with ``use_cuda_graph`` (see ``distripy.runtime.factory``)."""

KERNEL_BACKENDS = ("auto", "triton", "torch")
"""``torch``: the references; ``triton``: the Triton kernels (CUDA); ``auto``: per call, by the
tensors' device (see ``distripy.kernels``)."""

HALO_CONV_BACKENDS = ("cudnn", "triton")
"""The halo convolution where the patch layer runs GPU kernels: ``cudnn`` (the default, the measured
winner: the band written halo-padded by one Triton pass with its GroupNorm prologue fused in,
``kernels.halo_pad``, then one cuDNN convolution) or ``triton`` (experimental: the fused Triton
implicit-GEMM kernel reading the halos in place, ``kernels.halo_conv``)."""

EXCHANGE_CODECS = ("none", "fp8", "residual2", "residual1")
"""How an asynchronous step can send the self-attention's keys and values: ``none``, at the
model's precision; ``fp8``, e4m3 with a power-of-two scale per token (``kernels.fp8_codec``);
``residual2`` / ``residual1``, the 2- or 1-bit change since what the receivers already hold, with
error feedback (``kernels.residual_codec``)."""

COMPRESS_CHOICES = EXCHANGE_CODECS + (AUTO_MODE,)
"""What ``DistriConfig.compress`` accepts: one of ``EXCHANGE_CODECS``, or ``"auto"``: per
generation, ``parallel.compress_choice`` decides from the planner's prediction for the machine."""

CHECK_EVERY_STEP_VARIABLE = "DISTRIPY_CHECK_EVERY_STEP"
"""The environment variable that turns ``DistriConfig.check_every_step`` on by default ("1")."""

DEFAULT_TIMEOUT_S = 300.0
"""The longest any wait for a transfer may take before it raises (``DistriConfig.timeout_s`` and
every ``Comm``'s default)."""


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"DistriConfig.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class DistriConfig:
    """Settings of displaced patch parallelism.

    ``mode``: one of ``MODES``, or ``"auto"`` (the default): per generation, the mode and warm-up
    that ``distripy.parallel.policy.choose_mode`` picks from the number of steps, which a
    parallelised pipeline knows and a bare UNet is told with ``distripy.reset(unet, steps=n)``.
    ``warmup_steps``: how many steps at the start of every generation are synchronous (fresh,
    exact exchanges); the asynchronous steps follow. With ``mode="auto"`` it applies only to a
    generation whose number of steps is unknown (set a mode to choose the warm-up yourself). The first step is synchronous even with 0:
    there is nothing stale to use yet. DistriFusion's reference implementation
    (``distrifuser.DistriConfig``) counts differently: its ``warmup_steps=W`` makes steps ``0..W``
    synchronous, ``W + 1`` steps; its default 4 is this default 5. So distripy's ``W + 1`` is its
    ``W``.
    ``split_batch``: with an even batch (classifier-free guidance's (uncond, cond) halves) and an
    even number of ranks, each half of the ranks denoises one half of the batch. ``"auto"``: split
    when ``distripy.plan``'s model predicts the split step faster for the generation's size, rank
    count and steps on this machine's GPU (``parallel.split``).
    ``comm_backend``: ``nccl`` (the C++ runtime), ``torch`` (torch.distributed) or ``auto`` (the
    default: the C++ runtime for a model on CUDA when ``distripy._C`` loads, else torch.distributed;
    decided from where the model is when ``parallelize`` is called).
    ``kernel_backend``: ``triton`` (the Triton kernels, CUDA), ``torch`` (the references) or
    ``auto`` (on CUDA the Triton kernels, on CPU the references).
    ``halo_conv_backend``: the band convolutions' path where the kernels are Triton's (``cudnn``,
    the default: the halo-padded band, GroupNorm fused into its write, then cuDNN; ``triton``:
    the fused Triton convolution, experimental, opt-in; see ``HALO_CONV_BACKENDS``).
    ``timeout_s``: the longest any wait for a transfer may take before it raises.
    ``use_cuda_graph``: run each UNet step as a replayed CUDA graph (CUDA; with the C++ runtime,
    ``comm_backend='nccl'`` or ``'auto'``, or a ``LoopbackComm``): one graph per input shape and
    step kind (synchronous warm-up, asynchronous) and step parity, captured the second time that
    kind of step is met and replayed from then on, across generations of the same shape. It
    removes the per-step launch cost of the UNet's ~thousand small kernels, which is what limits
    small bands (1024², 8 GPUs); the result equals eager execution. ``None`` (the default): on
    for a model on CUDA whose communicator can join a capture (the C++ runtime, or a given comm
    that supports graphs), off otherwise (CPU, ``comm_backend='torch'``). The smaller the band,
    the more the eager step is bound by the host's launches, and the more the graphs gain (the
    measurements: docs/results.md).

    ``compile``: compile each step's band forward (the model's own forward on this rank's band;
    the host-side step logic stays eager) with ``torch.compile``'s inductor in its default mode,
    lazily at the model's first step and again for each new input shape; with ``use_cuda_graph``
    the graphs capture the compiled forward. The step breaks only at the communication
    checkpoints, and the patch layer's GroupNorm and halo convolutions are traced through their
    torch references (``PatchContext.kernel_backend``), so inductor fuses them with their
    neighbours instead of calling opaque kernels. Off by default: a compile of SDXL takes minutes
    per input shape and step kind. Never ``reduce-overhead``: its CUDA graphs would nest inside
    ``use_cuda_graph``'s.

    ``compress``: how the steps after the warm-up send the self-attention's keys and values (one
    of ``EXCHANGE_CODECS``; ``"none"``, the default, sends them at the model's precision;
    ``"auto"``: for an asynchronous mode, the faster of ``fp8`` and ``residual2`` for a generation
    whose keys and values the planner predicts its machine's link cannot hide, ``none`` otherwise,
    on a machine it has no profile of, and for ``full_sync`` and ``exact``). The first
    ``warmup_steps`` steps (at least the first) exchange at full precision, so the receivers start
    from the exact keys and values; after them each rank sends its band's keys and values
    compressed, and the others attend over what they decode. ``residual2`` and ``residual1`` send
    only the change since the last step's (quantised to 2 or 1 bits per element with error
    feedback: what one step's quantisation loses, the next step's change carries), and each rank
    keeps every band's baseline in fp8 (about half the memory of the uncompressed exchange's keys
    and values); ``fp8`` sends each step's values as e4m3. It changes the image a little (a trade
    of its own, measured by ``bench/quality.py``). In the asynchronous modes it compresses the
    stale exchanges; in ``full_sync`` and ``exact`` the fresh ones, which then no longer equal one
    device (so ``warmup_steps`` counts their full-precision steps; a few-step ``exact`` generation
    compresses only with fewer warm-up steps than steps). ``naive_patch`` exchanges nothing and
    refuses a codec.

    ``check_every_step``: the ranks compare every step's latent and timestep, not only each
    generation's inputs (one copy to the host and one object exchange per step: for debugging a
    loop that may diverge across ranks). Its default is true when the environment sets
    ``DISTRIPY_CHECK_EVERY_STEP=1``.

    Frozen: a parallelised model reads it on every step; ``dataclasses.replace`` makes a changed
    copy for the next ``parallelize``.
    """

    warmup_steps: int = DEFAULT_WARMUP_STEPS
    mode: str = DEFAULT_MODE
    split_batch: Union[bool, str] = True
    comm_backend: str = "auto"
    kernel_backend: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S
    use_cuda_graph: Optional[bool] = None
    compile: bool = False
    check_every_step: bool = field(default_factory=lambda: os.environ.get(CHECK_EVERY_STEP_VARIABLE) == "1")
    halo_conv_backend: str = "cudnn"
    compress: str = "none"

    def __post_init__(self) -> None:
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ConfigError(f"DistriConfig.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        _check_choice("mode", self.mode, MODE_CHOICES)
        if not isinstance(self.split_batch, bool) and self.split_batch != "auto":
            raise ConfigError(f"DistriConfig.split_batch={self.split_batch!r} must be True, False or 'auto'")
        _check_choice("comm_backend", self.comm_backend, COMM_BACKENDS)
        _check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _check_choice("halo_conv_backend", self.halo_conv_backend, HALO_CONV_BACKENDS)
        _check_choice("compress", self.compress, COMPRESS_CHOICES)
        if self.compress != "none" and self.mode == "naive_patch":
            raise ConfigError(
                f"DistriConfig.compress={self.compress!r} with mode='naive_patch': that mode exchanges "
                "no keys and values to compress"
            )
        if not isinstance(self.check_every_step, bool):
            raise ConfigError(
                f"DistriConfig.check_every_step={self.check_every_step!r} must be True or False"
            )
        if not isinstance(self.compile, bool):
            raise ConfigError(f"DistriConfig.compile={self.compile!r} must be True or False")
        if self.use_cuda_graph is not None and not isinstance(self.use_cuda_graph, bool):
            raise ConfigError(
                f"DistriConfig.use_cuda_graph={self.use_cuda_graph!r} must be True, False or None (automatic)"
            )
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
