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

``own`` may also be the band's partial sums per spatial chunk, ``(B, G, chunks, 2)``
(``group_norm_partial_stats``): the op adds the chunks (in order, as ``group_norm_sum_partials``
does) and, given ``sums_out``, writes the band's added sums into those buffers too: in an
asynchronous step the buffer the all-reduce for the next step works in and the one that keeps the
band's sums for the next step's correction. The statistics of a layer then take two launches (the
partial sums, this op) instead of a torch sum and two copies besides.
"""

import enum
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels.group_norm_combine import corrected_sums, mean_rstd, stale_sums
from distripy.kernels.group_norm_sum_partials import check_sums, check_sums_out, sum_chunks

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
    sums0_ptr,
    sums1_ptr,
    n,
    chunks,
    count,
    scale,
    eps,
    MODE: tl.constexpr,
    WRITE_SUMS0: tl.constexpr,
    WRITE_SUMS1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    own_sum, own_sq = sum_chunks(own_ptr, offsets, mask, chunks)
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
    # after every load: a buffer given may be one the loads read (each program reads only its own)
    if WRITE_SUMS0:
        tl.store(sums0_ptr + 2 * offsets, own_sum, mask=mask)
        tl.store(sums0_ptr + 2 * offsets + 1, own_sq, mask=mask)
    if WRITE_SUMS1:
        tl.store(sums1_ptr + 2 * offsets, own_sum, mask=mask)
        tl.store(sums1_ptr + 2 * offsets + 1, own_sq, mask=mask)


def _check(own: torch.Tensor, image_prev, own_prev, mode: Combine, count: int, scale: float) -> None:
    check_sums("group_norm_mean_rstd", "own", own)
    if count <= 0:
        raise InputError(f"group_norm_mean_rstd: count must be positive, got {count}")
    if mode is not Combine.LOCAL:
        if not scale >= 1:
            raise InputError(f"group_norm_mean_rstd: scale must be >= 1, got {scale}")
        shape = tuple(own.shape[:2]) + (2,)
        for name, value in (("image_prev", image_prev), ("own_prev", own_prev)):
            if value is None or tuple(value.shape) != shape or value.dtype != own.dtype:
                raise InputError(
                    f"group_norm_mean_rstd: {mode.name} needs {name} as (B, G, 2) float32 sums {shape}, "
                    f"got {None if value is None else (tuple(value.shape), value.dtype)}"
                )


def group_norm_mean_rstd_reference(
    own: torch.Tensor,
    image_prev: Optional[torch.Tensor],
    own_prev: Optional[torch.Tensor],
    mode: Combine,
    count: int,
    scale: float,
    eps: float,
    sums_out: Sequence[Optional[torch.Tensor]] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The formulas of ``group_norm_combine``, composed in plain torch, after a torch sum over the
    chunks of partial sums; the band's sums are copied into ``sums_out`` last (a buffer given may be
    one of the previous step's: it is read first)."""
    if own.dim() == 4:
        own = own.sum(dim=2)
    if mode is Combine.LOCAL:
        mean, rstd = mean_rstd(own, count, eps)
    elif mode is Combine.CORRECTED:
        estimate = corrected_sums(image_prev, own_prev, own, scale)
        mean, rstd = mean_rstd(estimate, round(count * scale), eps, fallback_sums=own, fallback_count=count)
    else:
        mean, rstd = mean_rstd(stale_sums(image_prev, own_prev, own), round(count * scale), eps)
    with torch.no_grad():  # exchanged and kept values, outside autograd (group_norm_sum_partials)
        for out in sums_out:
            if out is not None:
                out.copy_(own)
    return mean, rstd


def _mean_rstd_launch(
    own,
    image_prev,
    own_prev,
    mode: Combine,
    count: int,
    scale: float,
    eps: float,
    sums0: Optional[torch.Tensor] = None,
    sums1: Optional[torch.Tensor] = None,
):
    """The kernel's launch, and the mean and rstd it writes (and the band's sums into ``sums0`` /
    ``sums1``, contiguous, where given)."""
    own = own.contiguous()
    chunks = own.shape[2] if own.dim() == 4 else 1
    image_prev = own if image_prev is None else image_prev.contiguous()
    own_prev = own if own_prev is None else own_prev.contiguous()
    n = own.shape[0] * own.shape[1]
    mean = own.new_empty(own.shape[:2])
    rstd = own.new_empty(own.shape[:2])
    block = max(16, triton.next_power_of_2(min(n, 1024)))
    args = (
        own,
        image_prev,
        own_prev,
        mean,
        rstd,
        mean if sums0 is None else sums0,
        mean if sums1 is None else sums1,
        n,
        chunks,
        float(count),
        float(scale),
        float(eps),
    )
    kwargs = dict(MODE=int(mode), WRITE_SUMS0=sums0 is not None, WRITE_SUMS1=sums1 is not None, BLOCK=block)
    launch = Launch(_mean_rstd_kernel, (triton.cdiv(n, block),), args, kwargs)
    return launch, mean, rstd


def group_norm_mean_rstd_triton(
    own,
    image_prev,
    own_prev,
    mode: Combine,
    count: int,
    scale: float,
    eps: float,
    sums0: Optional[torch.Tensor] = None,
    sums1: Optional[torch.Tensor] = None,
):
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    launch, mean, rstd = _mean_rstd_launch(own, image_prev, own_prev, mode, count, scale, eps, sums0, sums1)
    launch.run()
    return mean, rstd


# ``combine``, not ``mode``: torch's functionalization of an op that mutates its arguments
# (``auto_functionalized``) takes a keyword argument named ``mode`` itself.
@torch.library.custom_op("distripy::group_norm_mean_rstd", mutates_args=("sums0", "sums1"))
def _mean_rstd_op(
    own: torch.Tensor,
    image_prev: Optional[torch.Tensor],
    own_prev: Optional[torch.Tensor],
    combine: int,
    count: int,
    scale: float,
    eps: float,
    sums0: Optional[torch.Tensor],
    sums1: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return group_norm_mean_rstd_triton(
        own, image_prev, own_prev, Combine(combine), count, scale, eps, sums0, sums1
    )


@_mean_rstd_op.register_fake
def _(own, image_prev, own_prev, combine, count, scale, eps, sums0, sums1):
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
    sums_out: Sequence[Optional[torch.Tensor]] = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean, rstd)`` (B, G) fp32 of a patch GroupNorm (module docstring). ``own``: the band's
    ``(B, G, 2)`` sums or ``(B, G, chunks, 2)`` partial sums; ``sums_out``: at most two contiguous
    ``(B, G, 2)`` fp32 tensors (``None`` entries skipped) that also receive the band's sums.
    ``backend``: ``torch`` (the reference), ``triton`` (the op ``distripy::group_norm_mean_rstd``)
    or ``auto`` (Triton on CUDA)."""
    try:
        mode = Combine(mode)
    except ValueError:
        names = [m.name for m in Combine]
        raise InputError(f"group_norm_mean_rstd: mode must be one of {names}, got {mode!r}") from None
    _check(own, image_prev, own_prev, mode, count, scale)
    sums0, sums1 = check_sums_out("group_norm_mean_rstd", own, sums_out)
    if use_triton(backend, own, "group_norm_mean_rstd"):
        return torch.ops.distripy.group_norm_mean_rstd(
            own, image_prev, own_prev, int(mode), count, float(scale), eps, sums0, sums1
        )
    return group_norm_mean_rstd_reference(own, image_prev, own_prev, mode, count, scale, eps, (sums0, sums1))
