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

Optional prologue (``GroupNormPrologue``): the band is a GroupNorm's *input*, normalised with given
per-(batch, group) mean and rstd, affine and SiLU as it is loaded, so that a ResNet block reads its
activation once instead of writing and re-reading the normalised tensor. The halos are the
neighbours' rows *after* the prologue (what they send is their activated boundary rows), and the
zero padding is the padding of the activated image, so the result equals the unfused
``GroupNorm -> SiLU -> conv`` of the whole image.

Output-row ranges (``rows``, ``interior_rows``): a band's output rows that read no halo row can be
computed before the halos arrive, and the boundary rows after, into the same output tensor (the
``exact`` mode's convolution: the halo exchange hides behind the interior rows). The kernel takes
the range's first row and row count; the references convolve the rows the range reads.

Three ways to compute a band (``backend``): ``torch`` (the reference: prologue, ``torch.cat``,
convolution), ``triton`` (the fused kernel, autotuned per shape on CUDA), ``cudnn`` (the prologue
writes straight into the interior rows of a halo-padded buffer, the halo rows are copied in, one
cuDNN convolution). ``auto`` takes the torch reference on CPU and, on CUDA, the faster of the two
CUDA paths for the shape (``kernels.halo_conv_dispatch``).
"""

import os
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from distripy.config import KERNEL_BACKENDS
from distripy.errors import InputError
from distripy.kernels._backend import on_gpu
from distripy.kernels._launch import Launch
from distripy.kernels._layout import needs_64_bit_offsets
from distripy.kernels.group_norm_apply import GroupNormPrologue, prologue_from_op_args, prologue_op_args
from distripy.kernels.halo_pad import halo_pad

__all__ = [
    "GroupNormPrologue",
    "autotuned_tiles",
    "band_compatible",
    "halo_conv2d",
    "halo_conv2d_cudnn",
    "halo_conv2d_reference",
    "halo_conv2d_triton",
    "halo_rows",
    "interior_rows",
]

BACKENDS = KERNEL_BACKENDS + ("cudnn",)  # cudnn: the halo-padded buffer + cuDNN path


def band_compatible(kernel: int, padding: int, stride: int, dilation: int = 1) -> bool:
    """Whether a convolution with these height parameters maps ``H`` rows to ``H / stride`` rows
    for every ``H`` divisible by ``stride``, so that bands of the input give bands of the output."""
    extent = dilation * (kernel - 1) + 1
    return 0 <= 2 * padding - extent + stride < stride


def halo_rows(kernel: int, padding: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """Rows ``(top, bottom)`` a band needs from the bands above and below it."""
    if not band_compatible(kernel, padding, stride, dilation):
        raise InputError(
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
        raise InputError(f"halo_conv2d: {name} halo must have shape {expected}, got {tuple(halo.shape)}")
    if halo.dtype != x.dtype or halo.device != x.device:
        raise InputError(
            f"halo_conv2d: {name} halo is {halo.dtype} on {halo.device}, the band is {x.dtype} on {x.device}"
        )


class _BandConv(NamedTuple):
    stride: Tuple[int, int]
    pad_w: int
    dilation: Tuple[int, int]
    top_rows: int
    bottom_rows: int


def _check_prologue(prologue: Optional[GroupNormPrologue], x: torch.Tensor) -> None:
    if prologue is None:
        return
    batch, channels = x.shape[:2]
    groups = prologue.num_groups
    if groups <= 0 or channels % groups != 0:
        raise InputError(f"halo_conv2d: {channels} channels do not split into num_groups={groups} groups")
    for name in ("mean", "rstd"):
        value = getattr(prologue, name)
        if tuple(value.shape) != (batch, groups) or value.device != x.device:
            raise InputError(
                f"halo_conv2d: prologue {name} must be ({batch}, {groups}) on {x.device}, "
                f"got {tuple(value.shape)} on {value.device}"
            )
    for name in ("weight", "bias"):
        value = getattr(prologue, name)
        if value is not None and (tuple(value.shape) != (channels,) or value.device != x.device):
            raise InputError(
                f"halo_conv2d: prologue {name} must be ({channels},) on {x.device}, "
                f"got {tuple(value.shape)} on {value.device}"
            )


def _band_conv(x, top, bottom, weight, stride, padding, dilation, prologue=None) -> _BandConv:
    """The height/width parameters of a band's convolution, after checking the band, its halos and
    the prologue."""
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)
    top_rows, bottom_rows = halo_rows(weight.shape[2], pad_h, stride_h, dil_h)
    rows = x.shape[2]
    if rows % stride_h != 0:
        raise InputError(f"halo_conv2d: band height {rows} is not a multiple of the stride {stride_h}")
    _check_halo(top, x, top_rows, "top")
    _check_halo(bottom, x, bottom_rows, "bottom")
    _check_prologue(prologue, x)
    return _BandConv((stride_h, stride_w), pad_w, (dil_h, dil_w), top_rows, bottom_rows)


def _zeros_if_none(halo: Optional[torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros((x.shape[0], x.shape[1], rows, x.shape[3])) if halo is None else halo


def interior_rows(height: int, kernel: int, padding: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """Output rows ``[begin, end)`` of a band of ``height`` input rows that read no halo row: what
    can be computed before the halo arrives. The rows before ``begin`` read the top halo, the rows
    from ``end`` the bottom halo; for a band thinner than the kernel the range is empty (and
    ``[0, begin)`` and ``[end, height / stride)`` still cover every output row)."""
    top, _ = halo_rows(kernel, padding, stride, dilation)
    extent = dilation * (kernel - 1) + 1
    out_rows = height // stride
    begin = min(-(-top // stride), out_rows)
    end = max(begin, min((height - extent + top) // stride + 1, out_rows))
    return begin, end


def _check_range(x, weight, conv: _BandConv, out, rows) -> Tuple[int, int]:
    """``rows`` as ``(begin, end)`` (every output row when ``None``), after checking it and ``out``."""
    out_rows = x.shape[2] // conv.stride[0]
    if out is not None:
        out_width = _out_width(x.shape[3], weight.shape[3], conv.pad_w, conv.stride[1], conv.dilation[1])
        expected = (x.shape[0], weight.shape[0], out_rows, out_width)
        if tuple(out.shape) != expected or out.dtype != x.dtype or out.device != x.device:
            raise InputError(
                f"halo_conv2d: out is {tuple(out.shape)} {out.dtype} on {out.device}; expected {expected} "
                f"{x.dtype} on {x.device}"
            )
    if rows is None:
        return 0, out_rows
    begin, end = int(rows[0]), int(rows[1])
    if not 0 <= begin <= end <= out_rows:
        raise InputError(f"halo_conv2d: rows={tuple(rows)} is not a range within [0, {out_rows}]")
    return begin, end


def _window_conv(x, top, bottom, weight, bias, conv: _BandConv, groups, begin, end, activate):
    """The convolution of output rows ``[begin, end)`` from the input rows they read, taken from
    the top halo, the band (through ``activate``, the prologue or nothing) and the bottom halo, a
    missing halo reading as zeros; concatenated only when the window spans more than one."""
    kernel_h, stride_h = weight.shape[2], conv.stride[0]
    extent = conv.dilation[0] * (kernel_h - 1) + 1
    height = x.shape[2]
    low = stride_h * begin - conv.top_rows  # the window's first row, in the band's coordinates
    high = stride_h * (end - 1) - conv.top_rows + extent  # one past its last
    pieces = []
    if low < 0:
        halo = _zeros_if_none(top, x, conv.top_rows)
        pieces.append(halo[:, :, conv.top_rows + low : conv.top_rows + min(high, 0)])
    if min(high, height) > max(low, 0):
        pieces.append(activate(x[:, :, max(low, 0) : min(high, height)]))
    if high > height:
        halo = _zeros_if_none(bottom, x, conv.bottom_rows)
        pieces.append(halo[:, :, max(low - height, 0) : high - height])
    window = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return F.conv2d(window, weight, bias, conv.stride, (0, conv.pad_w), conv.dilation, groups)


def _place(result: torch.Tensor, x, weight, conv: _BandConv, out, begin: int, end: int) -> torch.Tensor:
    """``result`` (the rows ``[begin, end)``) as the band's output: itself when it is every row and
    no ``out`` was given, else copied into those rows of ``out`` (a new tensor when ``None``)."""
    out_rows = x.shape[2] // conv.stride[0]
    if out is None and (begin, end) == (0, out_rows):
        return result
    if out is None:
        out = _new_output(x, weight.shape[0], out_rows, result.shape[3])
    out[:, :, begin:end].copy_(result)
    return out


def write_sends(
    x: torch.Tensor,
    prologue: Optional[GroupNormPrologue],
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    backend: str,
) -> None:
    """The band's activated first rows into ``sends[0]`` and last rows into ``sends[1]`` (each
    optional; its height says how many rows): what the neighbours receive as their halos."""
    for send, first in ((sends[0], True), (sends[1], False)):
        if send is None:
            continue
        count = send.shape[2]
        if send.shape[:2] != x.shape[:2] or send.shape[3] != x.shape[3] or count > x.shape[2]:
            raise InputError(f"halo_conv2d: a send of shape {tuple(send.shape)} for a band of {tuple(x.shape)}")
        rows = x[:, :, :count] if first else x[:, :, x.shape[2] - count :]
        if prologue is None:
            send.copy_(rows)
        else:
            prologue.apply(rows, out=send, backend=backend)


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
    prologue: Optional[GroupNormPrologue] = None,
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """Plain torch: the input rows the output rows read, ``[top or zeros, band, bottom or zeros]``
    along the height (the prologue applied to the band's), convolved with the height padding
    removed (it is the halo) and the width padding kept."""
    conv = _band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
    begin, end = _check_range(x, weight, conv, out, rows)
    write_sends(x, prologue, sends, "torch")
    if begin == end:
        return _empty_output(x, weight, conv) if out is None else out

    def activate(band_rows: torch.Tensor) -> torch.Tensor:
        return band_rows if prologue is None else prologue.apply(band_rows)

    result = _window_conv(x, top, bottom, weight, bias, conv, groups, begin, end, activate)
    return _place(result, x, weight, conv, out, begin, end)


@triton.jit
def _halo_conv2d_kernel(
    x_ptr,
    top_ptr,
    bottom_ptr,
    w_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    norm_w_ptr,
    norm_b_ptr,
    out_ptr,
    channels,
    rows,
    width,
    out_channels,
    out_rows,
    out_row_begin,
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
    groups,
    channels_per_group,
    HAS_TOP: tl.constexpr,
    HAS_BOTTOM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(2)
    pixels = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_mask = pixels < out_rows * out_width  # out_rows: the rows of this launch's range
    out_row = out_row_begin + pixels // out_width
    out_col = pixels % out_width
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = outs < out_channels
    if INDEX_64:  # a tensor of 2^31 elements or more: every offset in 64 bits
        batch = batch.to(tl.int64)
        out_row = out_row.to(tl.int64)
        out_col = out_col.to(tl.int64)
        outs = outs.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block), so the compiler pipelines every load of the reduction.
    channel_blocks = tl.cdiv(channels, BLOCK_K)
    for step in range(0, KH * KW * channel_blocks):
        tap = step // channel_blocks
        kh = tap // KW
        kw = tap % KW
        ks = (step % channel_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        if INDEX_64:
            ks = ks.to(tl.int64)
            kh = kh.to(tl.int64)
            kw = kw.to(tl.int64)
        k_mask = ks < channels
        # The input row in the band's coordinates (< 0: the top halo, >= rows: the bottom halo)
        # selects, per output pixel, which tensor the row comes from: one load of one pointer tensor.
        row = out_row * stride_h + kh * dil_h - top_rows
        col = out_col * stride_w - pad_w + kw * dil_w
        valid = pixel_mask & (col >= 0) & (col < width)
        in_band = valid & (row >= 0) & (row < rows)
        row_start = x_ptr + batch * x_sb + row * x_sh + col * x_sw
        channel_stride = tl.zeros_like(row) + x_sc
        if HAS_TOP:
            in_top = row < 0
            row_start = tl.where(
                in_top, top_ptr + batch * t_sb + (row + top_rows) * t_sh + col * t_sw, row_start
            )
            channel_stride = tl.where(in_top, t_sc, channel_stride)
            valid_rows = row >= -top_rows
        else:
            valid_rows = row >= 0
        if HAS_BOTTOM:
            in_bottom = row >= rows
            row_start = tl.where(
                in_bottom, bottom_ptr + batch * b_sb + (row - rows) * b_sh + col * b_sw, row_start
            )
            channel_stride = tl.where(in_bottom, b_sc, channel_stride)
            valid_rows = valid_rows & (row < rows + bottom_rows)
        else:
            valid_rows = valid_rows & (row < rows)
        mask = (valid & valid_rows)[:, None] & k_mask[None, :]
        a = tl.load(row_start[:, None] + channel_stride[:, None] * ks[None, :], mask=mask, other=0.0)
        if PROLOGUE:
            # GroupNorm apply (+ SiLU) of the band's rows; the halos arrive already activated, and
            # the padding is the activated image's zero, not the prologue of a zero.
            stat = batch * groups + ks // channels_per_group
            mean = tl.load(mean_ptr + stat, mask=k_mask, other=0.0)
            rstd = tl.load(rstd_ptr + stat, mask=k_mask, other=0.0)
            y = (a.to(tl.float32) - mean[None, :]) * rstd[None, :]
            if HAS_NORM_WEIGHT:
                y = y * tl.load(norm_w_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_NORM_BIAS:
                y = y + tl.load(norm_b_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if SILU:
                y = y * tl.sigmoid(y)
            a = tl.where(in_band[:, None], y.to(x_ptr.dtype.element_ty), a)
        w = tl.load(
            w_ptr + outs[None, :] * w_so + ks[:, None] * w_sc + kh * w_sh + kw * w_sw,
            mask=k_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + batch * o_sb + outs[None, :] * o_sc + out_row[:, None] * o_sh + out_col[:, None] * o_sw
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pixel_mask[:, None] & out_mask[None, :])


# Tiles (output pixels x output channels x input channels) tried per shape on CUDA. SDXL's bands
# range from 4 rows x 32 columns (deepest level, 1024², 8 ranks: 128 pixels) to 480 x 480 (230k
# pixels), with 320 to 2560 input and 320 to 1280 output channels. Each tile compiles for sm_90a
# and sm_80 without register spills and within shared memory, and tiles of 64+ rows use wgmma on
# Hopper, for both layouts, with and without the prologue (tests/test_compile_targets.py;
# bench/compile_report.py for the full table). Larger tiles (128x256, 256x128, 128x128x64) spill.
def _tiles(*tiles) -> List[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in tiles
    ]


_CONFIGS_16BIT = _tiles(
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 5),
    (32, 64, 64, 4, 4),
    (32, 128, 64, 4, 4),
)
# fp32 operands take twice the registers and shared memory: shallower reductions.
_CONFIGS_FP32 = _tiles(
    (128, 128, 16, 8, 4),
    (64, 64, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 128, 32, 4, 3),
)
_CONFIGS = _CONFIGS_16BIT + _CONFIGS_FP32


def autotune_configs(dtype: torch.dtype) -> List[triton.Config]:
    """The tiles the autotuner tries for inputs of ``dtype``."""
    return _CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles of the input's dtype; drop tiles much taller than the band's output (a
    128-pixel band does not need 256-pixel tiles) or wider than the output channels; keep at least
    the smallest."""
    own = {id(c) for c in autotune_configs(named_args["x_ptr"].dtype)}
    configs = [c for c in configs if id(c) in own]
    pixels = named_args["out_rows"] * named_args["out_width"]
    out_channels = named_args["out_channels"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(pixels))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(out_channels))
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_halo_conv2d_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["channels", "out_channels", "out_rows", "out_width", "stride_h", "stride_w", "KH", "KW", "PROLOGUE"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(_halo_conv2d_kernel)


def autotuned_tiles() -> dict:
    """The tiles the autotuner chose in this process, by its key (channels, out channels, output
    rows and width, strides, kernel size, prologue): what a benchmark records beside its times."""
    return {
        repr(key[: len(_halo_conv2d_tuned.keys)]): {
            **config.kwargs,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        }
        for key, config in getattr(_halo_conv2d_tuned, "cache", {}).items()
    }


# Under Triton's interpreter (CPU tests) one small tile: tuning would time on a GPU.
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _out_width(width: int, kernel_w: int, pad_w: int, stride_w: int, dil_w: int) -> int:
    return (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# id(weight) -> (weak reference to it, data_ptr, version, dtype, packed copy); an entry leaves with
# its weight (tensors compare element-wise, so a WeakKeyDictionary cannot hold them).
_PACKED_WEIGHTS: Dict[int, Tuple[weakref.ref, int, int, torch.dtype, torch.Tensor]] = {}


def _packed_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the kernel reads it well: ``dtype`` and channels-last memory, so that each
    tap's input channels (the reduction) are contiguous and their loads are vectorised and
    pipelined (an OIHW weight gathers 2-byte elements 9 apart). Cached per weight tensor and
    checked against its storage and version, so a UNet's weights are packed once and re-packed
    after a change (a LoRA fused in place or through ``.data``)."""
    if weight.dtype == dtype and weight.is_contiguous(memory_format=torch.channels_last):
        return weight
    key = id(weight)
    stamp = (weight.data_ptr(), weight._version, dtype)
    cached = _PACKED_WEIGHTS.get(key)
    if cached is not None and cached[0]() is weight and cached[1:4] == stamp:
        return cached[4]
    packed = weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    reference = weakref.ref(weight, lambda _, key=key: _PACKED_WEIGHTS.pop(key, None))
    _PACKED_WEIGHTS[key] = (reference, *stamp, packed)
    return packed


def _new_output(x: torch.Tensor, out_channels: int, out_rows: int, out_width: int) -> torch.Tensor:
    return torch.empty(
        (x.shape[0], out_channels, out_rows, out_width),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format,
    )


def _empty_output(x: torch.Tensor, weight: torch.Tensor, conv: _BandConv) -> torch.Tensor:
    """An uninitialised output of the band's convolution."""
    out_width = _out_width(x.shape[3], weight.shape[3], conv.pad_w, conv.stride[1], conv.dilation[1])
    return _new_output(x, weight.shape[0], x.shape[2] // conv.stride[0], out_width)


def _conv_launch(
    x, top, bottom, weight, bias, conv: _BandConv, prologue, out=None, rows=None
) -> Tuple[Launch, torch.Tensor]:
    """The kernel's launch computing the band's output rows ``rows`` (``[begin, end)``; all when
    ``None``) into ``out`` (a new tensor when ``None``), and that output. On CUDA the kernel is the
    autotuned one (the grid a function of the tile); under the interpreter one small tile."""
    (stride_h, stride_w), pad_w, (dil_h, dil_w) = conv.stride, conv.pad_w, conv.dilation
    top_rows, bottom_rows = conv.top_rows, conv.bottom_rows
    kernel_h, kernel_w = weight.shape[2:]
    batch, channels, height, width = x.shape
    out_width = _out_width(width, kernel_w, pad_w, stride_w, dil_w)
    out_channels = weight.shape[0]
    if out is None:
        out = _new_output(x, out_channels, height // stride_h, out_width)
    row_begin, row_end = (0, height // stride_h) if rows is None else rows
    has_top = top is not None and top_rows > 0
    has_bottom = bottom is not None and bottom_rows > 0
    top_arg = top if has_top else x
    bottom_arg = bottom if has_bottom else x
    weight = _packed_weight(weight, x.dtype)
    if prologue is not None:
        mean, rstd = prologue.mean.float().contiguous(), prologue.rstd.float().contiguous()
        norm_w, norm_b, norm_groups = prologue.weight, prologue.bias, prologue.num_groups
    else:
        mean = rstd = norm_w = norm_b = None
        norm_groups = 1
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    args = (
        x, top_arg, bottom_arg, weight, bias if bias is not None else weight,
        mean if mean is not None else x, rstd if rstd is not None else x,
        norm_w if norm_w is not None else x, norm_b if norm_b is not None else x,
        out,
        channels, height, width, out_channels, row_end - row_begin, row_begin, out_width,
        *x.stride(), *top_arg.stride(), *bottom_arg.stride(), *weight.stride(), *out.stride(),
        top_rows, bottom_rows, stride_h, stride_w, pad_w, dil_h, dil_w,
        norm_groups, channels // norm_groups,
    )  # fmt: skip
    flags = dict(
        HAS_TOP=has_top,
        HAS_BOTTOM=has_bottom,
        HAS_BIAS=bias is not None,
        PROLOGUE=prologue is not None,
        HAS_NORM_WEIGHT=norm_w is not None,
        HAS_NORM_BIAS=norm_b is not None,
        SILU=prologue is not None and prologue.silu,
        KH=kernel_h,
        KW=kernel_w,
        PRECISION="tf32" if tf32 else "ieee",
        INDEX_64=needs_64_bit_offsets(x, top_arg, bottom_arg, weight, out),
    )
    pixels = (row_end - row_begin) * out_width
    if _interpreted(x):
        tile = _INTERPRETER_TILE
        grid = (triton.cdiv(pixels, tile["BLOCK_M"]), triton.cdiv(out_channels, tile["BLOCK_N"]), batch)
        return Launch(_halo_conv2d_kernel, grid, args, dict(flags, **tile)), out

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(out_channels, meta["BLOCK_N"]), batch)

    return Launch(_halo_conv2d_tuned, grid, args, flags), out


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
    prologue: Optional[GroupNormPrologue] = None,
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``groups`` must be 1. A new
    output has ``x``'s memory format (channels-last in, channels-last out). fp32 inputs multiply in
    TF32 when ``torch.backends.cudnn.allow_tf32`` is set (torch's default for cuDNN convolutions).
    ``out`` / ``rows``: as ``halo_conv2d``'s; the kernel writes the range's rows in place."""
    if groups != 1:
        raise InputError(f"halo_conv2d_triton: groups={groups}; the kernel handles groups=1 only")
    conv = _band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
    rows = _check_range(x, weight, conv, out, rows)
    launch, out = _conv_launch(x, top, bottom, weight, bias, conv, prologue, out, rows)
    if rows[1] > rows[0]:
        launch.run()
    return out


def halo_conv2d_cudnn(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    prologue: Optional[GroupNormPrologue] = None,
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """``F.conv2d`` (cuDNN on CUDA), the prologue by a Triton kernel on CUDA.

    Every row: one halo-padded buffer in ``x``'s memory format, built in one pass by
    ``kernels.halo_pad`` (the band activated into its interior, the halo rows or zeros around it,
    the activated boundary rows into ``sends``), then one convolution without height padding.
    The interior rows (``interior_rows``) of a band with at most 1/8 boundary rows into a new
    output: one convolution of the band with the layer's own zero padding, no halo and no copy;
    the other rows of that output read zeros in place of the halos (they are the boundary rows,
    computed again next). Any other range (and the interior of a thin band, where that would
    compute up to twice the rows): the rows it reads, convolved, copied into ``out``."""
    conv = _band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
    begin, end = _check_range(x, weight, conv, out, rows)
    height = x.shape[2]
    out_rows = height // conv.stride[0]
    prologue_backend = "triton" if on_gpu(x) else "torch"

    def activate(band_rows: torch.Tensor, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        if prologue is None:
            return band_rows if into is None else into.copy_(band_rows)
        return prologue.apply(band_rows, out=into, backend=prologue_backend)

    if (begin, end) == (0, out_rows):
        padded = halo_pad(
            x, top, bottom, conv.top_rows, conv.bottom_rows, prologue, sends, backend=prologue_backend
        )
        result = F.conv2d(padded, weight, bias, conv.stride, (0, conv.pad_w), conv.dilation, groups)
        return _place(result[:, :, :out_rows], x, weight, conv, out, begin, end)
    write_sends(x, prologue, sends, prologue_backend)
    if begin == end:
        return _empty_output(x, weight, conv) if out is None else out
    inner_begin, inner_end = interior_rows(
        height, weight.shape[2], conv.top_rows, conv.stride[0], conv.dilation[0]
    )
    boundary = out_rows - (inner_end - inner_begin)
    if out is None and (begin, end) == (inner_begin, inner_end) and 8 * boundary <= out_rows:
        # Recomputing the few boundary rows costs less than copying the interior into an output.
        padding_hw = (conv.top_rows, conv.pad_w)
        return F.conv2d(activate(x), weight, bias, conv.stride, padding_hw, conv.dilation, groups)
    result = _window_conv(x, top, bottom, weight, bias, conv, groups, begin, end, activate)
    return _place(result, x, weight, conv, out, begin, end)


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
    norm_mean: Optional[torch.Tensor],
    norm_rstd: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool,
) -> torch.Tensor:
    prologue = prologue_from_op_args(norm_mean, norm_rstd, norm_weight, norm_bias, num_groups, silu)
    return halo_conv2d_triton(x, top, bottom, weight, bias, stride, padding, dilation, 1, prologue)


@_halo_conv2d_op.register_fake
def _(x, top, bottom, weight, bias, stride, padding, dilation, *prologue):
    out_width = _out_width(x.shape[3], weight.shape[3], padding[1], stride[1], dilation[1])
    return torch.empty(
        (x.shape[0], weight.shape[0], x.shape[2] // stride[0], out_width),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format,
    )


@torch.library.custom_op("distripy::halo_conv2d_rows_", mutates_args=("out",))
def _halo_conv2d_rows_op(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    norm_mean: Optional[torch.Tensor],
    norm_rstd: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool,
    out: torch.Tensor,
    row_begin: int,
    row_end: int,
) -> None:
    """The Triton kernel writing the output rows ``[row_begin, row_end)`` into ``out`` in place."""
    prologue = prologue_from_op_args(norm_mean, norm_rstd, norm_weight, norm_bias, num_groups, silu)
    halo_conv2d_triton(
        x, top, bottom, weight, bias, stride, padding, dilation, 1, prologue, out, (row_begin, row_end)
    )


@_halo_conv2d_rows_op.register_fake
def _(x, top, bottom, weight, bias, stride, padding, dilation, *rest):
    return None


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
    prologue: Optional[GroupNormPrologue] = None,
    backend: str = "torch",
    out: Optional[torch.Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """A band's convolution output from the band ``x`` (B, C, h, W) and its halos: ``top``
    (B, C, top_rows, W) from the band above, ``bottom`` (B, C, bottom_rows, W) from the band below,
    ``None`` at the image's edge (zero padding). See ``halo_rows`` for the row counts. With a
    ``prologue`` the band is first normalised (+ SiLU); the halos must already be.

    ``rows``: compute only the output rows ``[begin, end)`` (every row when ``None``), written into
    ``out`` (the band's whole output tensor, its other rows untouched) or into a new output whose
    other rows are unspecified. A range that reads no halo (``interior_rows``) can be computed
    before the halos arrive (pass ``None`` for them), the boundary rows into the same ``out`` after.

    ``sends``: tensors (B, C, rows, W) that take the band's first and last rows, activated (after
    the prologue), for its neighbours (either may be None): on the cuDNN path they are written by
    the same kernel that builds the convolution's input.

    ``backend``: ``torch`` (the reference), ``triton`` (the ops ``distripy::halo_conv2d`` and
    ``distripy::halo_conv2d_rows_``; grouped convolutions take the ``cudnn`` path), ``cudnn``
    (``F.conv2d``, see ``halo_conv2d_cudnn``) or ``auto`` (``torch`` on CPU; on CUDA the path
    ``kernels.halo_conv_dispatch`` picks for the shape)."""
    if x.dim() != 4:
        raise InputError(f"halo_conv2d: x must be (B, C, h, W), got shape {tuple(x.shape)}")
    if backend not in BACKENDS:
        raise InputError(f"halo_conv2d: backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        from distripy.kernels.halo_conv_dispatch import DEFAULT_PATH, choose_halo_conv_path

        if not on_gpu(x):
            backend = "torch"
        elif x.is_meta:  # counting a GPU step on meta (``meta_as_gpu``): no GPU to look up
            backend = DEFAULT_PATH
        else:
            backend = choose_halo_conv_path(x, weight, stride, groups)
    arguments = (x, top, bottom, weight, bias, stride, padding, dilation, groups, prologue)
    sends = tuple(sends)
    if backend == "triton" and groups == 1:
        write_sends(x, prologue, sends, "triton")
        ints = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)))
        if out is None and rows is None:
            return torch.ops.distripy.halo_conv2d(
                x, top, bottom, weight, bias, *ints, *prologue_op_args(prologue)
            )
        conv = _band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
        begin, end = _check_range(x, weight, conv, out, rows)
        out = _empty_output(x, weight, conv) if out is None else out
        torch.ops.distripy.halo_conv2d_rows_(
            x, top, bottom, weight, bias, *ints, *prologue_op_args(prologue), out, begin, end
        )
        return out
    if backend in ("triton", "cudnn"):
        return halo_conv2d_cudnn(*arguments, out=out, rows=rows, sends=sends)
    return halo_conv2d_reference(*arguments, out=out, rows=rows, sends=sends)
