"""How the Triton kernels address a (B, C, *spatial) tensor: batch, channel and one flat spatial
stride, which covers contiguous NCHW, channels-last and row bands (views) of either."""

from typing import Tuple

import torch

__all__ = ["flat_spatial_strides", "next_power_of_2"]


def flat_spatial_strides(x: torch.Tensor) -> Tuple[torch.Tensor, int, int, int, int]:
    """``(x', stride_b, stride_c, stride_s, spatial)`` with ``x'`` = ``x`` when its spatial dims
    flatten to one stride, else a contiguous copy."""
    sizes, strides = x.shape[2:], x.stride()[2:]
    flattens = all(strides[i] == strides[i + 1] * sizes[i + 1] for i in range(len(sizes) - 1) if sizes[i] > 1)
    if not flattens:
        x = x.contiguous()
        strides = x.stride()[2:]
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    stride_s = strides[-1] if strides else 1
    return x, x.stride(0), x.stride(1), stride_s, spatial


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
