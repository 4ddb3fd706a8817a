"""GroupNorm statistics of one band: per (batch, group) sum and sum of squares, in fp32.

A patch GroupNorm cannot normalise a band with the band's own statistics (that is the
``naive_patch`` seam); it needs the whole image's. Sums (not means) are what ranks exchange,
because sums of equal-sized bands add up to the image's and can be corrected term by term
(``kernels.group_norm_combine``).

The Triton kernel: programs over (batch x group, spatial chunk), each walking its chunk of the
group's channels x spatial positions in tiles, accumulating in fp32, and writing the chunk's partial
sums (deterministic, no atomics). Chunks exist because SDXL has only 32 groups: one program per
(batch, group) would leave most of a GPU's multiprocessors idle on a large band. Any layout whose
spatial dims flatten to one stride (NCHW, channels-last, a band of either) is read in place.

This op adds the chunks' partial sums with a torch sum. The patch GroupNorm instead takes them as
they are (``group_norm_partial_stats``, the same kernel) and lets the op that consumes the sums add
them (``group_norm_mean_rstd``, ``group_norm_sum_partials``): one launch fewer per layer.
"""

import functools
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels._layout import flat_spatial_strides, needs_64_bit_offsets, next_power_of_2

__all__ = [
    "StatsTiling",
    "elements_per_group",
    "group_norm_stats",
    "group_norm_stats_reference",
    "group_norm_stats_triton",
    "stats_launch",
    "stats_tiling",
]


@triton.jit
def _group_norm_stats_kernel(
    x_ptr,
    out_ptr,
    stride_b,
    stride_c,
    stride_s,
    channels_per_group,
    spatial,
    chunk,
    groups,
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // groups
    group = pid % groups
    channels = tl.arange(0, BLOCK_C)
    channel_mask = channels < channels_per_group
    if INDEX_64:  # a band of 2^31 elements or more: offsets in 64 bits
        batch = batch.to(tl.int64)
        group = group.to(tl.int64)
        channels = channels.to(tl.int64)
    base = x_ptr + batch * stride_b + group * channels_per_group * stride_c
    total = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    total_sq = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    first = tl.program_id(1) * chunk
    for start in range(first, tl.minimum(first + chunk, spatial), BLOCK_S):
        positions = start + tl.arange(0, BLOCK_S)
        if INDEX_64:
            positions = positions.to(tl.int64)
        mask = channel_mask[:, None] & (positions < spatial)[None, :]
        x = tl.load(base + channels[:, None] * stride_c + positions[None, :] * stride_s, mask=mask, other=0.0)
        x = x.to(tl.float32)
        total += x
        total_sq += x * x
    out = out_ptr + (pid * tl.num_programs(1) + tl.program_id(1)) * 2
    tl.store(out, tl.sum(tl.sum(total, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(total_sq, axis=1), axis=0))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(x: torch.Tensor) -> int:
    """Enough programs to fill the GPU a few times over (4 under the interpreter, so that the CPU
    tests split small bands into chunks too)."""
    if x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 4
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return 4 * _multiprocessors(index)


class StatsTiling(NamedTuple):
    """How the kernel cuts a band: ``chunks`` spatial chunks of ``chunk`` positions each (the last
    one shorter), walked in tiles of ``block_c`` channels x ``block_s`` positions."""

    chunk: int
    chunks: int
    block_c: int
    block_s: int


def stats_tiling(x: torch.Tensor, num_groups: int, chunks: Optional[int] = None) -> StatsTiling:
    """The kernel's cut of ``x`` (B, C, *spatial) into spatial chunks: ``chunks`` asked for (by
    default enough programs to fill the device), then adjusted so that each chunk is a whole number
    of tiles and none is empty. A function of the shape and device only, so that the op's fake
    implementation and the torch reference cut exactly as the kernel does."""
    batch, channels = x.shape[:2]
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    if batch == 0 or spatial == 0:
        raise InputError(f"group_norm_stats: x must not be empty, got shape {tuple(x.shape)}")
    per_group = channels // num_groups
    block_c = next_power_of_2(per_group)
    block_s = max(16, min(next_power_of_2(spatial), 4096 // block_c))
    if chunks is None:
        chunks = -(-_programs_wanted(x) // (batch * num_groups))
    if chunks < 1:
        raise InputError(f"group_norm_stats: chunks must be positive, got {chunks}")
    chunks = max(1, min(chunks, -(-spatial // 16)))
    # each chunk a whole number of tiles, tiles no longer than a chunk needs
    per_chunk = -(-spatial // chunks)
    block_s = max(16, min(block_s, next_power_of_2(per_chunk)))
    chunk = -(-per_chunk // block_s) * block_s
    return StatsTiling(chunk, -(-spatial // chunk), block_c, block_s)


def stats_launch(
    x: torch.Tensor, num_groups: int, chunks: Optional[int] = None
) -> Tuple[Launch, torch.Tensor]:
    """The kernel's launch on ``x`` and the ``(B, G, chunks, 2)`` buffer it writes."""
    tiling = stats_tiling(x, num_groups, chunks)
    x, stride_b, stride_c, stride_s, spatial = flat_spatial_strides(x)
    batch, channels = x.shape[:2]
    partial = torch.empty((batch, num_groups, tiling.chunks, 2), dtype=torch.float32, device=x.device)
    launch = Launch(
        _group_norm_stats_kernel,
        (batch * num_groups, tiling.chunks),
        (x, partial, stride_b, stride_c, stride_s, channels // num_groups, spatial, tiling.chunk, num_groups),
        dict(INDEX_64=needs_64_bit_offsets(x), BLOCK_C=tiling.block_c, BLOCK_S=tiling.block_s),
    )
    return launch, partial


def group_norm_stats_triton(x: torch.Tensor, num_groups: int, chunks: Optional[int] = None) -> torch.Tensor:
    """The Triton kernel's ``(B, G, 2)`` fp32 statistics (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    ``chunks``: spatial chunks per (batch, group); by default enough to fill the device."""
    launch, partial = stats_launch(x, num_groups, chunks)
    launch.run()
    return partial[:, :, 0] if partial.shape[2] == 1 else partial.sum(dim=2)


def group_norm_stats_reference(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Plain-torch statistics: ``(B, G, 2)`` fp32 holding ``[sum, sum of squares]`` of each
    (batch, group) over the group's channels and every spatial position of ``x`` (B, C, *spatial)."""
    batch = x.shape[0]
    grouped = x.reshape(batch, num_groups, -1).float()
    return torch.stack((grouped.sum(dim=-1), grouped.square().sum(dim=-1)), dim=-1)


@torch.library.custom_op("distripy::group_norm_stats", mutates_args=())
def _group_norm_stats_op(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return group_norm_stats_triton(x, num_groups)


@_group_norm_stats_op.register_fake
def _(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], num_groups, 2), dtype=torch.float32)


def group_norm_stats(x: torch.Tensor, num_groups: int, backend: str = "torch") -> torch.Tensor:
    """``(B, G, 2)`` fp32 ``[sum, sum of squares]`` of ``x`` (B, C, *spatial) per (batch, group).
    ``backend``: ``torch`` (the reference), ``triton`` (the op ``distripy::group_norm_stats``) or
    ``auto`` (Triton on CUDA)."""
    if x.dim() < 2:
        raise InputError(f"group_norm_stats: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    if x.shape[1] % num_groups != 0:
        raise InputError(
            f"group_norm_stats: {x.shape[1]} channels do not split into num_groups={num_groups} groups"
        )
    if use_triton(backend, x, "group_norm_stats"):
        return torch.ops.distripy.group_norm_stats(x, num_groups)
    return group_norm_stats_reference(x, num_groups)


def elements_per_group(x: torch.Tensor, num_groups: int) -> int:
    """How many elements of ``x`` each (batch, group) statistic sums over."""
    return x[0].numel() // num_groups
