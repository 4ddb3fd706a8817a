"""How the Triton kernels address a (B, C, *spatial) tensor: batch, channel and one flat spatial
stride, which covers contiguous NCHW, channels-last and row bands (views) of either."""

from typing import Tuple

import torch

from distripy.errors import InputError

__all__ = ["check_packed", "flat_spatial_strides", "needs_64_bit_offsets", "next_power_of_2"]

INT32_LIMIT = 2**31 - 1


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


def needs_64_bit_offsets(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of ``tensors`` (from its first element, through its
    strides) can exceed a signed 32-bit integer, Triton's default index type: the kernels then
    compute every offset in 64 bits (slower, so only when needed). A VAE decoder band at 8K, or at
    3840² with batch 2, is past 2^31 elements."""
    for x in tensors:
        if x is None:
            continue
        extent = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()) if size > 0)
        if extent > INT32_LIMIT or x.numel() > INT32_LIMIT:
            return True
    return False


def check_packed(codec: str, packed: torch.Tensor, nbytes: int, what: str) -> None:
    """An exchange codec's packed buffer: contiguous uint8 ``(nbytes,)`` (``what`` says for which
    tensor, in the error)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != nbytes:
        raise InputError(
            f"{codec}: the packed buffer must be uint8 ({nbytes},) for {what}, got {packed.dtype} {tuple(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise InputError(f"{codec}: the packed buffer must be contiguous")
