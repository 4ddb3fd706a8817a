"""GroupNorm statistics of one band left in spatial chunks: ``(B, G, chunks, 2)`` fp32 partial sums.

``group_norm_stats``'s kernel computes a band's sums per (batch, group, spatial chunk); adding the
chunks up is one more launch (a torch sum) before the sums are used. The patch GroupNorm skips it:
the op that consumes the band's sums (``group_norm_mean_rstd``, or ``group_norm_sum_partials``
before an all-reduce) adds the chunks itself, in a fixed order, and writes the added sums where they
are kept. This op is that kernel with its partial sums returned as they are.

The chunks are ``stats_tiling``'s cut of the band (a function of its shape and device); the torch
reference cuts the same way, so both backends return the same partial sums, not only the same
totals.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels.group_norm_stats import stats_launch, stats_tiling

__all__ = [
    "group_norm_partial_stats",
    "group_norm_partial_stats_reference",
    "group_norm_partial_stats_triton",
]


def group_norm_partial_stats_triton(
    x: torch.Tensor, num_groups: int, chunks: Optional[int] = None
) -> torch.Tensor:
    """The Triton kernel's ``(B, G, chunks, 2)`` partial sums (CUDA, or CPU under
    ``TRITON_INTERPRET=1``)."""
    launch, partial = stats_launch(x, num_groups, chunks)
    launch.run()
    return partial


def group_norm_partial_stats_reference(
    x: torch.Tensor, num_groups: int, chunks: Optional[int] = None
) -> torch.Tensor:
    """Plain torch: ``[sum, sum of squares]`` of each (batch, group) over the group's channels and
    the spatial positions of each chunk of ``stats_tiling(x, num_groups, chunks)``."""
    tiling = stats_tiling(x, num_groups, chunks)
    batch = x.shape[0]
    grouped = x.reshape(batch, num_groups, x.shape[1] // num_groups, -1).float()
    per_position = torch.stack((grouped.sum(dim=2), grouped.square().sum(dim=2)), dim=-1)  # (B, G, S, 2)
    spatial = per_position.shape[2]
    # zero positions past the band's end fill the last chunk, as the kernel's masked loads do
    padded = F.pad(per_position, (0, 0, 0, tiling.chunks * tiling.chunk - spatial))
    return padded.reshape(batch, num_groups, tiling.chunks, tiling.chunk, 2).sum(dim=3)


@torch.library.custom_op("distripy::group_norm_partial_stats", mutates_args=())
def _group_norm_partial_stats_op(x: torch.Tensor, num_groups: int, chunks: Optional[int]) -> torch.Tensor:
    return group_norm_partial_stats_triton(x, num_groups, chunks)


@_group_norm_partial_stats_op.register_fake
def _(x: torch.Tensor, num_groups: int, chunks: Optional[int]) -> torch.Tensor:
    tiling = stats_tiling(x, num_groups, chunks)
    return x.new_empty((x.shape[0], num_groups, tiling.chunks, 2), dtype=torch.float32)


def group_norm_partial_stats(
    x: torch.Tensor, num_groups: int, chunks: Optional[int] = None, backend: str = "torch"
) -> torch.Tensor:
    """``(B, G, chunks, 2)`` fp32 ``[sum, sum of squares]`` of ``x`` (B, C, *spatial) per (batch,
    group, spatial chunk): their sum over ``chunks`` is ``group_norm_stats(x, num_groups)``.
    ``chunks``: asked for (``stats_tiling`` adjusts it), by default enough to fill the device.
    ``backend``: ``torch`` (the reference), ``triton`` (the op ``distripy::group_norm_partial_stats``)
    or ``auto`` (Triton on CUDA)."""
    if x.dim() < 2:
        raise InputError(f"group_norm_partial_stats: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    if num_groups < 1 or x.shape[1] % num_groups != 0:
        raise InputError(
            f"group_norm_partial_stats: {x.shape[1]} channels do not split into "
            f"num_groups={num_groups} groups"
        )
    if use_triton(backend, x, "group_norm_partial_stats"):
        return torch.ops.distripy.group_norm_partial_stats(x, num_groups, chunks)
    return group_norm_partial_stats_reference(x, num_groups, chunks)
