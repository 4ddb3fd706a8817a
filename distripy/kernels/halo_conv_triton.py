"""The fused Triton halo convolution: experimental, an explicit opt-in.

``DistriConfig(halo_conv_backend="triton")`` (or ``halo_conv2d(backend="triton")``) runs it; the
default on a GPU is the halo-padded band + cuDNN (``kernels.halo_conv``), the winner of every shape
``bench/kernel_speed.py`` has measured. It is kept, tested against float64
(``tests/test_triton_halo_conv.py``) and compiled for sm_90a and sm_80 (``bench/compile_report.py``)
so that a benchmark can show where it wins; a per-shape dispatch to it returns only then.

The kernel is an implicit GEMM (output pixels x output channels, reducing over input channels and
kernel taps) whose loads pick each input row from the top halo, the band or the bottom halo by its
index, so nothing is concatenated; rows and columns outside the image read as zero. With a
``GroupNormPrologue`` it normalises (+ SiLU) the band's rows as it loads them. It computes a range
of output rows into a given output, autotuned per shape on CUDA, one small tile under Triton's
interpreter. The ops ``distripy::halo_conv2d`` and ``distripy::halo_conv2d_rows_`` wrap it for
``torch.compile`` and the meta device (their fakes give the shapes); ``kernels.halo_conv2d``
calls them.
"""

import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._launch import Launch
from distripy.kernels._layout import needs_64_bit_offsets
from distripy.kernels.group_norm_apply import GroupNormPrologue, prologue_from_op_args
from distripy.kernels.halo_conv import (
    BandConv,
    band_conv,
    check_range,
    conv_out_width,
    is_channels_last,
    new_output,
)

__all__ = ["autotune_configs", "autotuned_tiles", "halo_conv2d_triton"]


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


def _conv_launch(
    x, top, bottom, weight, bias, conv: BandConv, prologue, out=None, rows=None
) -> Tuple[Launch, torch.Tensor]:
    """The kernel's launch computing the band's output rows ``rows`` (``[begin, end)``; all when
    ``None``) into ``out`` (a new tensor when ``None``), and that output. On CUDA the kernel is the
    autotuned one (the grid a function of the tile); under the interpreter one small tile."""
    (stride_h, stride_w), pad_w, (dil_h, dil_w) = conv.stride, conv.pad_w, conv.dilation
    top_rows, bottom_rows = conv.top_rows, conv.bottom_rows
    kernel_h, kernel_w = weight.shape[2:]
    batch, channels, height, width = x.shape
    out_width = conv_out_width(width, kernel_w, pad_w, stride_w, dil_w)
    out_channels = weight.shape[0]
    if out is None:
        out = new_output(x, out_channels, height // stride_h, out_width)
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
    conv = band_conv(x, top, bottom, weight, stride, padding, dilation, prologue)
    rows = check_range(x, weight, conv, out, rows)
    launch, out = _conv_launch(x, top, bottom, weight, bias, conv, prologue, out, rows)
    if rows[1] > rows[0]:
        launch.run()
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
    out_width = conv_out_width(x.shape[3], weight.shape[3], padding[1], stride[1], dilation[1])
    return torch.empty(
        (x.shape[0], weight.shape[0], x.shape[2] // stride[0], out_width),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format,
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
