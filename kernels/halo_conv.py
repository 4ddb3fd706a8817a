"""Halo-aware 2-D convolution of one horizontal band.

A band of rows ``[r0, r0 + h)`` of an image, convolved as part of the whole image, needs ``top``
rows above it and ``bottom`` rows below it from the neighbouring bands (the halo); at the image's
top and bottom edge those rows are the convolution's zero padding. The halo rows arrive from other
ranks in their own buffers. This reference concatenates them (plain torch); the Triton kernel
reads them in place.

Row arithmetic, for kernel ``k`` (dilated extent ``k_eff = d (k - 1) + 1``), padding ``p`` and
stride ``s`` along the height, with ``r0`` and ``h`` multiples of ``s``: output row ``o`` reads
input rows ``s o - p`` to ``s o - p + k_eff - 1``, so the band's ``h / s`` output rows need
``top = p`` rows above and ``bottom = k_eff - p - s`` rows below (none for a 3x3 stride-2 conv).
The band's outputs are the image's exactly when the convolution maps ``H`` rows to ``H / s``:
``0 <= 2 p - k_eff + s < s``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["halo_conv2d", "halo_conv2d_reference", "halo_rows", "band_compatible"]


def band_compatible(kernel: int, padding: int, stride: int, dilation: int = 1) -> bool:
    """Whether a convolution with these height parameters maps ``H`` rows to ``H / stride`` rows
    for every ``H`` divisible by ``stride``, so that bands of the input give bands of the output."""
    extent = dilation * (kernel - 1) + 1
    return 0 <= 2 * padding - extent + stride < stride


def halo_rows(kernel: int, padding: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """Rows ``(top, bottom)`` a band needs from the bands above and below it."""
    if not band_compatible(kernel, padding, stride, dilation):
        raise ValueError(
            f"a convolution with kernel={kernel}, padding={padding}, stride={stride}, dilation={dilation} "
            "along the height does not map bands to bands (needs 0 <= 2*padding - extent + stride < stride)"
        )
    extent = dilation * (kernel - 1) + 1
    return padding, max(0, extent - padding - stride)


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _halo_or_zeros(halo: Optional[torch.Tensor], x: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    expected = (x.shape[0], x.shape[1], rows, x.shape[3])
    if halo is None:
        return x.new_zeros(expected)
    if tuple(halo.shape) != expected:
        raise ValueError(f"halo_conv2d: {name} halo must have shape {expected}, got {tuple(halo.shape)}")
    if halo.dtype != x.dtype or halo.device != x.device:
        raise ValueError(
            f"halo_conv2d: {name} halo is {halo.dtype} on {halo.device}, the band is {x.dtype} on {x.device}"
        )
    return halo


def halo_conv2d_reference(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """Plain torch: concatenate ``[top or zeros, x, bottom or zeros]`` along the height and
    convolve with the height padding removed (it is the halo) and the width padding kept."""
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    top_rows, bottom_rows = halo_rows(weight.shape[2], pad_h, stride_h, dil_h)
    rows = x.shape[2]
    if rows % stride_h != 0:
        raise ValueError(f"halo_conv2d: band height {rows} is not a multiple of the stride {stride_h}")
    padded = torch.cat(
        (_halo_or_zeros(top, x, top_rows, "top"), x, _halo_or_zeros(bottom, x, bottom_rows, "bottom")), dim=2
    )
    out = F.conv2d(padded, weight, bias, (stride_h, stride_w), (0, pad_w), (dil_h, dil_w), groups)
    # With a bottom halo longer than the last output row reads (never for band-compatible
    # convolutions), trailing rows would be extra; the band's output is its first h / s rows.
    return out[:, :, : rows // stride_h]


def halo_conv2d(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """A band's convolution output from the band ``x`` (B, C, h, W) and its halos: ``top``
    (B, C, top_rows, W) from the band above, ``bottom`` (B, C, bottom_rows, W) from the band below,
    ``None`` at the image's edge (zero padding). See ``halo_rows`` for the row counts."""
    if x.dim() != 4:
        raise ValueError(f"halo_conv2d: x must be (B, C, h, W), got shape {tuple(x.shape)}")
    return halo_conv2d_reference(x, top, bottom, weight, bias, stride, padding, dilation, groups)
