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

The Triton kernel is an implicit GEMM (output pixels x output channels, reducing over input
channels and kernel taps) whose loads pick each input row from the top halo, the band or the bottom
halo by its index, so nothing is concatenated; rows and columns outside the image read as zero.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["halo_conv2d", "halo_conv2d_reference", "halo_conv2d_triton", "halo_rows", "band_compatible"]


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


def _check_halo(halo: Optional[torch.Tensor], x: torch.Tensor, rows: int, name: str) -> None:
    if halo is None:
        return
    expected = (x.shape[0], x.shape[1], rows, x.shape[3])
    if tuple(halo.shape) != expected:
        raise ValueError(f"halo_conv2d: {name} halo must have shape {expected}, got {tuple(halo.shape)}")
    if halo.dtype != x.dtype or halo.device != x.device:
        raise ValueError(
            f"halo_conv2d: {name} halo is {halo.dtype} on {halo.device}, the band is {x.dtype} on {x.device}"
        )


class _BandConv(NamedTuple):
    stride: Tuple[int, int]
    pad_w: int
    dilation: Tuple[int, int]
    top_rows: int
    bottom_rows: int


def _band_conv(x, top, bottom, weight, stride, padding, dilation) -> _BandConv:
    """The height/width parameters of a band's convolution, after checking the band and its halos."""
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    top_rows, bottom_rows = halo_rows(weight.shape[2], pad_h, stride_h, dil_h)
    rows = x.shape[2]
    if rows % stride_h != 0:
        raise ValueError(f"halo_conv2d: band height {rows} is not a multiple of the stride {stride_h}")
    _check_halo(top, x, top_rows, "top")
    _check_halo(bottom, x, bottom_rows, "bottom")
    return _BandConv((stride_h, stride_w), pad_w, (dil_h, dil_w), top_rows, bottom_rows)


def _zeros_if_none(halo: Optional[torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros((x.shape[0], x.shape[1], rows, x.shape[3])) if halo is None else halo


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
    conv = _band_conv(x, top, bottom, weight, stride, padding, dilation)
    padded = torch.cat(
        (_zeros_if_none(top, x, conv.top_rows), x, _zeros_if_none(bottom, x, conv.bottom_rows)), dim=2
    )
    out = F.conv2d(padded, weight, bias, conv.stride, (0, conv.pad_w), conv.dilation, groups)
    # With a bottom halo longer than the last output row reads (never for band-compatible
    # convolutions), trailing rows would be extra; the band's output is its first h / s rows.
    return out[:, :, : x.shape[2] // conv.stride[0]]


@triton.jit
def _halo_conv2d_kernel(
    x_ptr,
    top_ptr,
    bottom_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    channels,
    rows,
    width,
    out_channels,
    out_rows,
    out_width,
    x_sb, x_sc, x_sh, x_sw,
    t_sb, t_sc, t_sh, t_sw,
    b_sb, b_sc, b_sh, b_sw,
    w_so, w_sc, w_sh, w_sw,
    o_sb, o_sc, o_sh, o_sw,
    top_rows,
    bottom_rows,
    stride_h,
    stride_w,
    pad_w,
    dil_h,
    dil_w,
    HAS_TOP: tl.constexpr,
    HAS_BOTTOM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(2)
    pixels = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_mask = pixels < out_rows * out_width
    out_row = pixels // out_width
    out_col = pixels % out_width
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < out_channels
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KH):
        # the input row in the band's coordinates: < 0 in the top halo, >= rows in the bottom halo
        row = out_row * stride_h + kh * dil_h - top_rows
        for kw in tl.static_range(KW):
            col = out_col * stride_w - pad_w + kw * dil_w
            col_ok = pixel_mask & (col >= 0) & (col < width)
            in_band = col_ok & (row >= 0) & (row < rows)
            in_top = col_ok & (row < 0) & (row >= -top_rows)
            in_bottom = col_ok & (row >= rows) & (row < rows + bottom_rows)
            for start in range(0, channels, BLOCK_K):
                ks = start + tl.arange(0, BLOCK_K)
                k_mask = ks < channels
                a = tl.load(
                    x_ptr + batch * x_sb + ks[None, :] * x_sc + row[:, None] * x_sh + col[:, None] * x_sw,
                    mask=in_band[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if HAS_TOP:
                    a += tl.load(
                        top_ptr
                        + batch * t_sb
                        + ks[None, :] * t_sc
                        + (row + top_rows)[:, None] * t_sh
                        + col[:, None] * t_sw,
                        mask=in_top[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                if HAS_BOTTOM:
                    a += tl.load(
                        bottom_ptr
                        + batch * b_sb
                        + ks[None, :] * b_sc
                        + (row - rows)[:, None] * b_sh
                        + col[:, None] * b_sw,
                        mask=in_bottom[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                w = tl.load(
                    w_ptr + outs[None, :] * w_so + ks[:, None] * w_sc + kh * w_sh + kw * w_sw,
                    mask=k_mask[:, None] & out_mask[None, :],
                    other=0.0,
                )
                acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + batch * o_sb + outs[None, :] * o_sc + out_row[:, None] * o_sh + out_col[:, None] * o_sw
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pixel_mask[:, None] & out_mask[None, :])


def halo_conv2d_triton(
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
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``groups`` must be 1. The
    output has ``x``'s memory format (channels-last in, channels-last out)."""
    if groups != 1:
        raise ValueError(f"halo_conv2d_triton: groups={groups}; the kernel handles groups=1 only")
    conv = _band_conv(x, top, bottom, weight, stride, padding, dilation)
    (stride_h, stride_w), pad_w, (dil_h, dil_w) = conv.stride, conv.pad_w, conv.dilation
    top_rows, bottom_rows = conv.top_rows, conv.bottom_rows
    kernel_h, kernel_w = weight.shape[2:]
    batch, channels, rows, width = x.shape
    out_rows = rows // stride_h
    out_width = (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1
    out_channels = weight.shape[0]
    channels_last = (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    )
    out = torch.empty(
        (batch, out_channels, out_rows, out_width),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    top_arg = top if top is not None and top_rows > 0 else x
    bottom_arg = bottom if bottom is not None and bottom_rows > 0 else x
    weight = weight.to(x.dtype)
    block_m, block_n, block_k = 32, 32, 16
    grid = (triton.cdiv(out_rows * out_width, block_m), triton.cdiv(out_channels, block_n), batch)
    _halo_conv2d_kernel[grid](
        x, top_arg, bottom_arg, weight, bias if bias is not None else weight, out,
        channels, rows, width, out_channels, out_rows, out_width,
        *x.stride(), *top_arg.stride(), *bottom_arg.stride(), *weight.stride(), *out.stride(),
        top_rows, bottom_rows, stride_h, stride_w, pad_w, dil_h, dil_w,
        HAS_TOP=top is not None and top_rows > 0,
        HAS_BOTTOM=bottom is not None and bottom_rows > 0,
        HAS_BIAS=bias is not None,
        KH=kernel_h,
        KW=kernel_w,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )  # fmt: skip
    return out


@torch.library.custom_op("distripy::halo_conv2d", mutates_args=())
def _halo_conv2d_op(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
) -> torch.Tensor:
    return halo_conv2d_triton(x, top, bottom, weight, bias, stride, padding, dilation)


@_halo_conv2d_op.register_fake
def _(x, top, bottom, weight, bias, stride, padding, dilation):
    rows, width = x.shape[2], x.shape[3]
    kernel_w = weight.shape[3]
    out_width = (width + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(
        (x.shape[0], weight.shape[0], rows // stride[0], out_width),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )


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
    backend: str = "torch",
) -> torch.Tensor:
    """A band's convolution output from the band ``x`` (B, C, h, W) and its halos: ``top``
    (B, C, top_rows, W) from the band above, ``bottom`` (B, C, bottom_rows, W) from the band below,
    ``None`` at the image's edge (zero padding). See ``halo_rows`` for the row counts.
    ``backend``: ``torch`` (the reference) or ``triton`` (the op ``distripy::halo_conv2d``; grouped
    convolutions take the reference)."""
    if x.dim() != 4:
        raise ValueError(f"halo_conv2d: x must be (B, C, h, W), got shape {tuple(x.shape)}")
    if backend == "triton" and groups == 1:
        return torch.ops.distripy.halo_conv2d(
            x, top, bottom, weight, bias, list(_pair(stride)), list(_pair(padding)), list(_pair(dilation))
        )
    return halo_conv2d_reference(x, top, bottom, weight, bias, stride, padding, dilation, groups)
