"""Mean and rstd of a patch GroupNorm from its statistics, in one op.

``group_norm_combine`` holds the formulas (sync, corrected, stale, local) as plain torch on ``B x G``
numbers; run as written they are some twenty element-wise ops per GroupNorm layer, each a kernel
launch and a dispatcher call, for a few hundred numbers: SDXL has 46 GroupNorm layers in its UNet,
and a rank's asynchronous step is host-bound at 1024² on 8 GPUs. This op computes the same
``(mean, rstd)`` in one call (one Triton kernel on CUDA):

* ``LOCAL`` (also the sync case, with the all-reduced image sums as ``own``): the sums ``own`` over
  ``count`` elements;
* ``CORRECTED``: ``image_prev + scale * (own - own_prev)`` over ``count * scale`` elements, a group
  whose estimated variance is not positive taking ``own``'s variance (its mean kept);
* ``STALE``: ``image_prev - own_prev + own`` over ``count * scale`` elements.

``count`` is the elements per (batch, group) of the band, ``scale`` the image's over the band's.
Variances are biased; ``rstd = 1 / sqrt(max(var, 0) + eps)``.
"""

import enum
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels.group_norm_combine import corrected_sums, mean_rstd, stale_sums

__all__ = ["Combine", "group_norm_mean_rstd", "group_norm_mean_rstd_reference"]


class Combine(enum.IntEnum):
    LOCAL = 0
    CORRECTED = 1
    STALE = 2


@triton.jit
def _mean_rstd_kernel(
    own_ptr,
    image_prev_ptr,
    own_prev_ptr,
    mean_ptr,
    rstd_ptr,
    n,
    count,
    scale,
    eps,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    own_sum = tl.load(own_ptr + 2 * offsets, mask=mask, other=0.0)
    own_sq = tl.load(own_ptr + 2 * offsets + 1, mask=mask, other=0.0)
    if MODE == 0:
        total = count
        s = own_sum
        sq = own_sq
    else:
        total = count * scale
        prev_sum = tl.load(image_prev_ptr + 2 * offsets, mask=mask, other=0.0)
        prev_sq = tl.load(image_prev_ptr + 2 * offsets + 1, mask=mask, other=0.0)
        own_prev_sum = tl.load(own_prev_ptr + 2 * offsets, mask=mask, other=0.0)
        own_prev_sq = tl.load(own_prev_ptr + 2 * offsets + 1, mask=mask, other=0.0)
        if MODE == 1:
            s = prev_sum + scale * (own_sum - own_prev_sum)
            sq = prev_sq + scale * (own_sq - own_prev_sq)
        else:
            s = prev_sum - own_prev_sum + own_sum
            sq = prev_sq - own_prev_sq + own_sq
    mean = s / total
    var = sq / total - mean * mean
    if MODE == 1:
        own_mean = own_sum / count
        var = tl.where(var > 0, var, own_sq / count - own_mean * own_mean)
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    tl.store(mean_ptr + offsets, mean, mask=mask)
    tl.store(rstd_ptr + offsets, rstd, mask=mask)


def _check(own: torch.Tensor, image_prev, own_prev, mode: Combine, count: int, scale: float) -> None:
    if own.dim() != 3 or own.shape[-1] != 2 or own.dtype != torch.float32:
        raise InputError(
            f"group_norm_mean_rstd: own must be (B, G, 2) float32 sums, got {tuple(own.shape)} {own.dtype}"
        )
    if count <= 0:
        raise InputError(f"group_norm_mean_rstd: count must be positive, got {count}")
    if mode is not Combine.LOCAL:
        if not scale >= 1:
            raise InputError(f"group_norm_mean_rstd: scale must be >= 1, got {scale}")
        for name, value in (("image_prev", image_prev), ("own_prev", own_prev)):
            if value is None or value.shape != own.shape or value.dtype != own.dtype:
                raise InputError(
                    f"group_norm_mean_rstd: {mode.name} needs {name} shaped like own {tuple(own.shape)}"
                )


def group_norm_mean_rstd_reference(
    own: torch.Tensor,
    image_prev: Optional[torch.Tensor],
    own_prev: Optional[torch.Tensor],
    mode: Combine,
    count: int,
    scale: float,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The formulas of ``group_norm_combine``, composed in plain torch."""
    if mode is Combine.LOCAL:
        return mean_rstd(own, count, eps)
    if mode is Combine.CORRECTED:
        estimate = corrected_sums(image_prev, own_prev, own, scale)
        return mean_rstd(estimate, round(count * scale), eps, fallback_sums=own, fallback_count=count)
    return mean_rstd(stale_sums(image_prev, own_prev, own), round(count * scale), eps)


def _mean_rstd_launch(own, image_prev, own_prev, mode: Combine, count: int, scale: float, eps: float):
    """The kernel's launch, and the mean and rstd it writes."""
    own = own.contiguous()
    image_prev = own if image_prev is None else image_prev.contiguous()
    own_prev = own if own_prev is None else own_prev.contiguous()
    n = own.shape[0] * own.shape[1]
    mean = own.new_empty(own.shape[:2])
    rstd = own.new_empty(own.shape[:2])
    block = max(16, triton.next_power_of_2(min(n, 1024)))
    args = (own, image_prev, own_prev, mean, rstd, n, float(count), float(scale), float(eps))
    launch = Launch(_mean_rstd_kernel, (triton.cdiv(n, block),), args, dict(MODE=int(mode), BLOCK=block))
    return launch, mean, rstd


def group_norm_mean_rstd_triton(
    own, image_prev, own_prev, mode: Combine, count: int, scale: float, eps: float
):
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    launch, mean, rstd = _mean_rstd_launch(own, image_prev, own_prev, mode, count, scale, eps)
    launch.run()
    return mean, rstd


@torch.library.custom_op("distripy::group_norm_mean_rstd", mutates_args=())
def _mean_rstd_op(
    own: torch.Tensor,
    image_prev: Optional[torch.Tensor],
    own_prev: Optional[torch.Tensor],
    mode: int,
    count: int,
    scale: float,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return group_norm_mean_rstd_triton(own, image_prev, own_prev, Combine(mode), count, scale, eps)


@_mean_rstd_op.register_fake
def _(own, image_prev, own_prev, mode, count, scale, eps):
    return own.new_empty(own.shape[:2]), own.new_empty(own.shape[:2])


def group_norm_mean_rstd(
    own: torch.Tensor,
    image_prev: Optional[torch.Tensor] = None,
    own_prev: Optional[torch.Tensor] = None,
    mode: Combine = Combine.LOCAL,
    count: int = 1,
    scale: float = 1.0,
    eps: float = 1e-5,
    backend: str = "torch",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, rstd)`` (B, G) fp32 of a patch GroupNorm (module docstring). ``backend``: ``torch``
    (the reference), ``triton`` (the op ``distripy::group_norm_mean_rstd``) or ``auto`` (Triton on
    CUDA)."""
    mode = Combine(mode)
    _check(own, image_prev, own_prev, mode, count, scale)
    if use_triton(backend, own, "group_norm_mean_rstd"):
        return torch.ops.distripy.group_norm_mean_rstd(
            own, image_prev, own_prev, int(mode), count, float(scale), eps
        )
    return group_norm_mean_rstd_reference(own, image_prev, own_prev, mode, count, scale, eps)
