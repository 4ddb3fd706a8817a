"""A band's GroupNorm sums from their spatial chunks, written into the buffers that keep them.

In a synchronous step the patch GroupNorm all-reduces its band's ``(B, G, 2)`` sums in place, in a
buffer of its own (persistent under CUDA graphs), and keeps the band's sums for the next step in
another. This op adds ``group_norm_partial_stats``'s ``(B, G, chunks, 2)`` partial sums over the
chunks and writes the result into both buffers at once: one launch where a torch sum and two copies
were three. The chunks are added in their order, one after the other (deterministic, no atomics),
as ``group_norm_mean_rstd`` adds them in an asynchronous step (``sum_chunks``, shared by both
kernels).

``check_sums`` and ``check_sums_out`` validate the sums and output buffers of both ops.
"""

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch

__all__ = [
    "check_sums",
    "check_sums_out",
    "group_norm_sum_partials",
    "group_norm_sum_partials_reference",
    "group_norm_sum_partials_triton",
    "sum_chunks",
]


@triton.jit
def sum_chunks(partials_ptr, offsets, mask, chunks):
    """``[sum, sum of squares]`` of the (batch, group)s ``offsets`` from ``(n, chunks, 2)``
    contiguous partial sums, added chunk by chunk in order."""
    base = partials_ptr + offsets * chunks * 2
    total = tl.load(base, mask=mask, other=0.0)
    total_sq = tl.load(base + 1, mask=mask, other=0.0)
    for chunk in range(1, chunks):
        total += tl.load(base + 2 * chunk, mask=mask, other=0.0)
        total_sq += tl.load(base + 2 * chunk + 1, mask=mask, other=0.0)
    return total, total_sq


@triton.jit
def _sum_partials_kernel(
    partials_ptr,
    out0_ptr,
    out1_ptr,
    n,
    chunks,
    WRITE_1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    total, total_sq = sum_chunks(partials_ptr, offsets, mask, chunks)
    tl.store(out0_ptr + 2 * offsets, total, mask=mask)
    tl.store(out0_ptr + 2 * offsets + 1, total_sq, mask=mask)
    if WRITE_1:
        tl.store(out1_ptr + 2 * offsets, total, mask=mask)
        tl.store(out1_ptr + 2 * offsets + 1, total_sq, mask=mask)


def check_sums(op: str, name: str, sums: torch.Tensor) -> None:
    """``sums`` must be ``(B, G, 2)`` fp32 sums or ``(B, G, chunks, 2)`` fp32 partial sums."""
    if sums.dim() not in (3, 4) or sums.shape[-1] != 2 or sums.dtype != torch.float32:
        raise InputError(
            f"{op}: {name} must be (B, G, 2) float32 sums or (B, G, chunks, 2) float32 partial sums, "
            f"got {tuple(sums.shape)} {sums.dtype}"
        )
    if sums.dim() == 4 and sums.shape[2] < 1:
        raise InputError(f"{op}: {name} has no chunk: shape {tuple(sums.shape)}")


def check_sums_out(
    op: str, sums: torch.Tensor, sums_out: Sequence[Optional[torch.Tensor]]
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The (at most two) output buffers of ``sums_out`` as a pair, ``None`` where absent, each a
    contiguous ``(B, G, 2)`` fp32 tensor on ``sums``' device (the kernels write them flat)."""
    sums_out = tuple(sums_out)
    if len(sums_out) > 2:
        raise InputError(f"{op}: sums_out holds at most 2 tensors, got {len(sums_out)}")
    shape = tuple(sums.shape[:2]) + (2,)
    for index, out in enumerate(sums_out):
        if out is None:
            continue
        if (
            tuple(out.shape) != shape
            or out.dtype != torch.float32
            or out.device != sums.device
            or not out.is_contiguous()
        ):
            raise InputError(
                f"{op}: sums_out[{index}] must be a contiguous {shape} float32 tensor on {sums.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device} (contiguous: {out.is_contiguous()})"
            )
    if len(sums_out) == 2 and sums_out[0] is not None and sums_out[0] is sums_out[1]:
        raise InputError(f"{op}: sums_out holds the same tensor twice")
    padded = sums_out + (None,) * (2 - len(sums_out))
    return padded[0], padded[1]


def _sum_partials_launch(partials: torch.Tensor, out0: torch.Tensor, out1: Optional[torch.Tensor]) -> Launch:
    """The kernel's launch adding ``partials`` (B, G, chunks, 2) into ``out0`` (and ``out1``)."""
    partials = partials.contiguous()
    n = partials.shape[0] * partials.shape[1]
    chunks = partials.shape[2]
    block = max(16, triton.next_power_of_2(min(n, 1024)))
    args = (partials, out0, out0 if out1 is None else out1, n, chunks)
    kwargs = dict(WRITE_1=out1 is not None, BLOCK=block)
    return Launch(_sum_partials_kernel, (triton.cdiv(n, block),), args, kwargs)


def group_norm_sum_partials_triton(
    partials: torch.Tensor, out0: torch.Tensor, out1: Optional[torch.Tensor] = None
) -> None:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    _sum_partials_launch(partials, out0, out1).run()


def group_norm_sum_partials_reference(
    partials: torch.Tensor, out0: torch.Tensor, out1: Optional[torch.Tensor] = None
) -> None:
    """Plain torch: the sum over the chunks, copied into ``out0`` (and ``out1``). The buffers hold
    values that ranks exchange and keep for the next step, outside autograd (a transfer has no
    gradient): written without recording the copy, also when the band requires gradients."""
    sums = partials.sum(dim=2)
    with torch.no_grad():
        out0.copy_(sums)
        if out1 is not None:
            out1.copy_(sums)


@torch.library.custom_op("distripy::group_norm_sum_partials", mutates_args=("out0", "out1"))
def _sum_partials_op(partials: torch.Tensor, out0: torch.Tensor, out1: Optional[torch.Tensor]) -> None:
    group_norm_sum_partials_triton(partials, out0, out1)


@_sum_partials_op.register_fake
def _(partials: torch.Tensor, out0: torch.Tensor, out1: Optional[torch.Tensor]) -> None:
    return None


def group_norm_sum_partials(
    partials: torch.Tensor,
    sums_out: Sequence[Optional[torch.Tensor]] = (),
    backend: str = "torch",
) -> torch.Tensor:
    """``partials`` (B, G, chunks, 2) fp32 added over the chunks: ``(B, G, 2)`` fp32 ``[sum, sum of
    squares]``, written into each tensor of ``sums_out`` (at most two, ``None`` entries skipped;
    contiguous, ``(B, G, 2)`` fp32) and returned (the first one given; a new tensor if none is).
    ``partials`` (B, G, 2) counts as one chunk. ``backend``: ``torch`` (the reference), ``triton``
    (the op ``distripy::group_norm_sum_partials``) or ``auto`` (Triton on CUDA)."""
    op = "group_norm_sum_partials"
    check_sums(op, "partials", partials)
    out0, out1 = check_sums_out(op, partials, sums_out)
    if partials.dim() == 3:
        partials = partials.unsqueeze(2)
    if out0 is None:
        out0, out1 = out1, None
    if out0 is None:
        out0 = partials.new_empty(partials.shape[:2] + (2,))
    if use_triton(backend, partials, op):
        torch.ops.distripy.group_norm_sum_partials(partials, out0, out1)
    else:
        group_norm_sum_partials_reference(partials, out0, out1)
    return out0
