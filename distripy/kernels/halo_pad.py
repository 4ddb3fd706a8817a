"""A band's halo-padded convolution input, built in one pass: ``[top, activate(x), bottom]`` along
the height, and the band's activated boundary rows written out for its neighbours on the way.

The cuDNN path of a halo convolution (``kernels.halo_conv``) convolves one buffer whose first and
last rows are the neighbours' halo rows and whose interior is the band, normalised (+ SiLU) when
the convolution follows a GroupNorm. Built from separate ops that is an apply (or a copy) into the
interior, a copy per halo and, in an asynchronous step, one more apply per boundary row block that
the neighbours need next step: five kernels around each convolution, on a thin band each costing
more in launch and boundary than in bytes. This op does all of it in one kernel:

* ``padded[:, :, :top_rows]`` = ``top`` (zeros when ``None``: the image's edge),
* ``padded[:, :, top_rows : top_rows + h]`` = ``x`` normalised with ``prologue`` (+ SiLU), or ``x``,
* ``padded[:, :, top_rows + h :]`` = ``bottom`` (zeros when ``None``),
* ``send_top`` (when given) = the activated first ``send_top.shape[2]`` rows of the band,
  ``send_bottom`` = its activated last ``send_bottom.shape[2]`` rows: what the band above and the
  band below receive as their halos.

The halos are taken as they are (they were activated by the band that sent them). ``padded`` has
``x``'s memory format. The Triton kernel runs over (batch x group, tiles of the padded buffer's
flattened rows, batch x group x tile of the group's channels), each position loading from the one
of the three sources it lies in.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels._layout import flat_spatial_strides, needs_64_bit_offsets, next_power_of_2
from distripy.kernels.group_norm_apply import (
    GroupNormPrologue,
    group_norm_apply_reference,
    prologue_from_op_args,
    prologue_op_args,
)

__all__ = ["halo_pad", "halo_pad_reference", "halo_pad_triton"]


@triton.jit
def _halo_pad_kernel(
    x_ptr, top_ptr, bottom_ptr, out_ptr, send_top_ptr, send_bottom_ptr,
    mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    x_sb, x_sc, x_ss,
    t_sb, t_sc, t_ss,
    b_sb, b_sc, b_ss,
    o_sb, o_sc, o_ss,
    st_sb, st_sc, st_ss,
    sb_sb, sb_sc, sb_ss,
    channels_per_group, groups, channel_tiles,
    top_size, band_size, bottom_size, send_top_size, send_bottom_size,
    HAS_TOP: tl.constexpr, HAS_BOTTOM: tl.constexpr,
    SEND_TOP: tl.constexpr, SEND_BOTTOM: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # axis 0: tiles of the flattened rows (a large band has more than a grid's 65535 along y);
    # axis 1: (batch x group, tile of the group's channels)
    pid = tl.program_id(1) // channel_tiles
    batch = pid // groups
    group = pid % groups
    positions = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    local = (tl.program_id(1) % channel_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = local < channels_per_group
    channels = group * channels_per_group + local
    if INDEX_64:  # a tensor of 2^31 elements or more: offsets in 64 bits
        batch = batch.to(tl.int64)
        positions = positions.to(tl.int64)
        channels = channels.to(tl.int64)
    total = top_size + band_size + bottom_size
    inside = positions < total
    in_top = positions < top_size
    in_bottom = (positions >= top_size + band_size) & inside
    in_band = (positions >= top_size) & (positions < top_size + band_size)
    band_at = positions - top_size
    bottom_at = positions - top_size - band_size
    c2 = channels[:, None]
    cm = channel_mask[:, None]

    y = tl.load(
        x_ptr + batch * x_sb + c2 * x_sc + band_at[None, :] * x_ss, mask=cm & in_band[None, :], other=0.0
    ).to(tl.float32)
    if NORMALIZE:
        mean = tl.load(mean_ptr + pid).to(tl.float32)
        rstd = tl.load(rstd_ptr + pid).to(tl.float32)
        y = (y - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + channels, mask=channel_mask, other=1.0).to(tl.float32)[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
    y = tl.where(in_band[None, :], y, 0.0)
    if HAS_TOP:
        halo = tl.load(
            top_ptr + batch * t_sb + c2 * t_sc + positions[None, :] * t_ss, mask=cm & in_top[None, :], other=0.0
        ).to(tl.float32)
        y = tl.where(in_top[None, :], halo, y)
    if HAS_BOTTOM:
        halo = tl.load(
            bottom_ptr + batch * b_sb + c2 * b_sc + bottom_at[None, :] * b_ss,
            mask=cm & in_bottom[None, :],
            other=0.0,
        ).to(tl.float32)
        y = tl.where(in_bottom[None, :], halo, y)
    value = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + batch * o_sb + c2 * o_sc + positions[None, :] * o_ss, value, mask=cm & inside[None, :])
    if SEND_TOP:
        sends = in_band & (band_at < send_top_size)
        tl.store(
            send_top_ptr + batch * st_sb + c2 * st_sc + band_at[None, :] * st_ss, value, mask=cm & sends[None, :]
        )
    if SEND_BOTTOM:
        first = band_size - send_bottom_size
        sends = in_band & (band_at >= first)
        tl.store(
            send_bottom_ptr + batch * sb_sb + c2 * sb_sc + (band_at - first)[None, :] * sb_ss,
            value,
            mask=cm & sends[None, :],
        )


def _check(x, top, bottom, top_rows: int, bottom_rows: int, prologue, sends) -> None:
    if x.dim() != 4:
        raise InputError(f"halo_pad: x must be (B, C, h, W), got shape {tuple(x.shape)}")
    if top_rows < 0 or bottom_rows < 0:
        raise InputError(f"halo_pad: top_rows={top_rows} and bottom_rows={bottom_rows} must be >= 0")
    batch, channels, rows, width = x.shape
    for name, halo, count in (("top", top, top_rows), ("bottom", bottom, bottom_rows)):
        if halo is not None and tuple(halo.shape) != (batch, channels, count, width):
            raise InputError(
                f"halo_pad: {name} must be {(batch, channels, count, width)}, got {tuple(halo.shape)}"
            )
        if halo is not None and (halo.dtype != x.dtype or halo.device != x.device):
            raise InputError(f"halo_pad: {name} is {halo.dtype} on {halo.device}, x is {x.dtype} on {x.device}")
    for name, send in zip(("send_top", "send_bottom"), sends):
        if send is None:
            continue
        if send.dim() != 4 or send.shape[:2] != x.shape[:2] or send.shape[3] != width or send.shape[2] > rows:
            raise InputError(
                f"halo_pad: {name} must be (B, C, rows <= {rows}, {width}) like x, got {tuple(send.shape)}"
            )
        if send.dtype != x.dtype or send.device != x.device:
            raise InputError(f"halo_pad: {name} is {send.dtype} on {send.device}, x is {x.dtype} on {x.device}")
    if prologue is not None and channels % prologue.num_groups:
        raise InputError(f"halo_pad: {channels} channels do not split into {prologue.num_groups} groups")


def _new_padded(x: torch.Tensor, top_rows: int, bottom_rows: int) -> torch.Tensor:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(
        (x.shape[0], x.shape[1], top_rows + x.shape[2] + bottom_rows, x.shape[3]),
        device=x.device,
        dtype=x.dtype,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )


def halo_pad_reference(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    top_rows: int,
    bottom_rows: int,
    prologue: Optional[GroupNormPrologue] = None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """Plain torch: the activation of ``x`` (the GroupNorm apply's reference), the halos or zeros
    around it, the boundary rows copied into ``sends``."""
    batch, channels, _, width = x.shape
    activated = x
    if prologue is not None:
        mean, rstd, weight, bias, groups, silu = prologue
        activated = group_norm_apply_reference(x, mean, rstd, weight, bias, groups, silu)
    zeros = x.new_zeros
    parts = [
        zeros((batch, channels, top_rows, width)) if top is None else top,
        activated,
        zeros((batch, channels, bottom_rows, width)) if bottom is None else bottom,
    ]
    padded = _new_padded(x, top_rows, bottom_rows)
    padded.copy_(torch.cat(parts, dim=2))
    send_top, send_bottom = sends
    if send_top is not None:
        send_top.copy_(activated[:, :, : send_top.shape[2]])
    if send_bottom is not None:
        send_bottom.copy_(activated[:, :, activated.shape[2] - send_bottom.shape[2] :])
    return padded


def _halo_pad_launch(x, top, bottom, top_rows, bottom_rows, prologue, sends) -> Tuple[Launch, torch.Tensor]:
    """The kernel's launch and the padded buffer it writes."""
    x, x_sb, x_sc, x_ss, band_size = flat_spatial_strides(x)
    out = _new_padded(x, top_rows, bottom_rows)
    _, o_sb, o_sc, o_ss, total = flat_spatial_strides(out)
    width = x.shape[3]
    flat = []
    for tensor in (top, bottom) + tuple(sends):
        if tensor is None:
            flat.append((None, 0, 0, 0))
        else:
            tensor_flat, sb, sc, ss, _ = flat_spatial_strides(tensor)
            if tensor_flat is not tensor and any(tensor is send for send in sends):
                raise InputError("halo_pad: a send tensor's spatial dims must flatten to one stride")
            flat.append((tensor_flat, sb, sc, ss))
    (top, t_sb, t_sc, t_ss), (bottom, b_sb, b_sc, b_ss), (s_top, st_sb, st_sc, st_ss), (s_bot, sb_sb, sb_sc, sb_ss) = flat
    groups = 1 if prologue is None else prologue.num_groups
    per_group = x.shape[1] // groups
    block_c = min(64, next_power_of_2(per_group))  # a group's channels in tiles of at most 64
    channel_tiles = triton.cdiv(per_group, block_c)
    block_s = max(16, min(next_power_of_2(total), 4096 // block_c))
    placeholder = out
    if prologue is None:
        mean = rstd = weight = bias = None
    else:
        mean, rstd = prologue.mean.contiguous(), prologue.rstd.contiguous()
        weight, bias = prologue.weight, prologue.bias
    args = (
        x, placeholder if top is None else top, placeholder if bottom is None else bottom, out,
        placeholder if s_top is None else s_top, placeholder if s_bot is None else s_bot,
        placeholder if mean is None else mean, placeholder if rstd is None else rstd,
        placeholder if weight is None else weight, placeholder if bias is None else bias,
        x_sb, x_sc, x_ss, t_sb, t_sc, t_ss, b_sb, b_sc, b_ss, o_sb, o_sc, o_ss,
        st_sb, st_sc, st_ss, sb_sb, sb_sc, sb_ss,
        per_group, groups, channel_tiles,
        top_rows * width, band_size, bottom_rows * width,
        0 if s_top is None else s_top.shape[2] * width, 0 if s_bot is None else s_bot.shape[2] * width,
    )  # fmt: skip
    flags = dict(
        HAS_TOP=top is not None,
        HAS_BOTTOM=bottom is not None,
        SEND_TOP=s_top is not None,
        SEND_BOTTOM=s_bot is not None,
        NORMALIZE=prologue is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        SILU=prologue is not None and prologue.silu,
        INDEX_64=needs_64_bit_offsets(*(t for t in (x, top, bottom, out, s_top, s_bot) if t is not None)),
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        num_warps=8 if block_c * block_s >= 4096 else 4,
    )
    grid = (triton.cdiv(total, block_s), x.shape[0] * groups * channel_tiles)
    return Launch(_halo_pad_kernel, grid, args, flags), out


def halo_pad_triton(x, top, bottom, top_rows: int, bottom_rows: int, prologue=None, sends=(None, None)):
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    launch, out = _halo_pad_launch(x, top, bottom, top_rows, bottom_rows, prologue, tuple(sends))
    launch.run()
    return out


@torch.library.custom_op("distripy::halo_pad", mutates_args=("send_top", "send_bottom"))
def _halo_pad_op(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    top_rows: int,
    bottom_rows: int,
    mean: Optional[torch.Tensor],
    rstd: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool,
    send_top: Optional[torch.Tensor],
    send_bottom: Optional[torch.Tensor],
) -> torch.Tensor:
    prologue = prologue_from_op_args(mean, rstd, weight, bias, num_groups, silu)
    return halo_pad_triton(x, top, bottom, top_rows, bottom_rows, prologue, (send_top, send_bottom))


@_halo_pad_op.register_fake
def _(x, top, bottom, top_rows, bottom_rows, *rest):
    return _new_padded(x, top_rows, bottom_rows)


def halo_pad(
    x: torch.Tensor,
    top: Optional[torch.Tensor],
    bottom: Optional[torch.Tensor],
    top_rows: int,
    bottom_rows: int,
    prologue=None,
    sends: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
    backend: str = "torch",
) -> torch.Tensor:
    """The halo-padded buffer ``[top, activate(x), bottom]`` (module docstring); ``prologue`` a
    ``GroupNormPrologue`` or None (the band as it is); ``sends`` the tensors
    that take the activated first and last rows (either may be None). ``backend``: ``torch`` (the
    reference), ``triton`` (the op ``distripy::halo_pad``) or ``auto`` (Triton on CUDA)."""
    sends = tuple(sends)
    _check(x, top, bottom, top_rows, bottom_rows, prologue, sends)
    if use_triton(backend, x, "halo_pad"):
        return torch.ops.distripy.halo_pad(x, top, bottom, top_rows, bottom_rows, *prologue_op_args(prologue), *sends)
    return halo_pad_reference(x, top, bottom, top_rows, bottom_rows, prologue, sends)
