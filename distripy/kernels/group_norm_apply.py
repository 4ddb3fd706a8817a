"""GroupNorm apply: normalise with given per-(batch, group) mean and rstd, affine, optional SiLU.

Separate from the statistics because in a patch GroupNorm the mean and rstd come from the whole
image (combined across ranks), not from the band being normalised. ``out`` lets the result land
in a view, e.g. the interior rows of a buffer whose halo rows are received from neighbours.

The Triton kernel: programs over (batch x group, spatial tile), each normalising a tile of the
group's channels in fp32 and storing in the output's dtype through the output's own strides.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from distripy.errors import InputError
from distripy.kernels._backend import use_triton
from distripy.kernels._launch import Launch
from distripy.kernels._layout import flat_spatial_strides, needs_64_bit_offsets, next_power_of_2

__all__ = [
    "GroupNormPrologue",
    "group_norm_apply",
    "group_norm_apply_reference",
    "group_norm_apply_triton",
    "prologue_from_op_args",
    "prologue_op_args",
]


@triton.jit
def _group_norm_apply_kernel(
    x_ptr,
    out_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    x_stride_b,
    x_stride_c,
    x_stride_s,
    out_stride_b,
    out_stride_c,
    out_stride_s,
    channels_per_group,
    spatial,
    groups,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // groups
    group = pid % groups
    positions = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    local = tl.arange(0, BLOCK_C)
    channel_mask = local < channels_per_group
    channels = group * channels_per_group + local
    if INDEX_64:  # a tensor of 2^31 elements or more: offsets in 64 bits
        batch = batch.to(tl.int64)
        positions = positions.to(tl.int64)
        channels = channels.to(tl.int64)
    mask = channel_mask[:, None] & (positions < spatial)[None, :]
    mean = tl.load(mean_ptr + pid).to(tl.float32)
    rstd = tl.load(rstd_ptr + pid).to(tl.float32)
    x = tl.load(
        x_ptr + batch * x_stride_b + channels[:, None] * x_stride_c + positions[None, :] * x_stride_s,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + channels, mask=channel_mask, other=1.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    out = (
        out_ptr + batch * out_stride_b + channels[:, None] * out_stride_c + positions[None, :] * out_stride_s
    )
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def _apply_launch(x, mean, rstd, weight, bias, num_groups: int, silu: bool, out: torch.Tensor) -> Launch:
    """The kernel's launch normalising ``x`` into ``out`` (both already in a flat-spatial layout)."""
    _, x_stride_b, x_stride_c, x_stride_s, spatial = flat_spatial_strides(x)
    _, out_stride_b, out_stride_c, out_stride_s, _ = flat_spatial_strides(out)
    batch, channels = x.shape[:2]
    per_group = channels // num_groups
    block_c = next_power_of_2(per_group)
    block_s = max(16, min(next_power_of_2(spatial), 4096 // block_c))
    mean, rstd = mean.contiguous(), rstd.contiguous()
    args = (
        x, out, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean,
        x_stride_b, x_stride_c, x_stride_s, out_stride_b, out_stride_c, out_stride_s,
        per_group, spatial, num_groups,
    )  # fmt: skip
    flags = dict(
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        SILU=silu,
        INDEX_64=needs_64_bit_offsets(x, out),
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        # 4096-element tiles: 8 warps keep fp32 on sm_80 from spilling (bench/compile_report.py)
        num_warps=8 if block_c * block_s >= 4096 else 4,
    )
    return Launch(_group_norm_apply_kernel, (batch * num_groups, triton.cdiv(spatial, block_s)), args, flags)


def group_norm_apply_triton(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); writes ``out`` in place when
    given (its spatial dims must flatten to one stride, as a band of rows does)."""
    x = flat_spatial_strides(x)[0]
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape or flat_spatial_strides(out)[0] is not out:
        raise InputError(
            "group_norm_apply: out must have x's shape with spatial dims that flatten to one stride"
        )
    _apply_launch(x, mean, rstd, weight, bias, num_groups, silu, out).run()
    return out


def group_norm_apply_reference(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool = False,
) -> torch.Tensor:
    """Plain torch, computed in fp32 and returned in ``x``'s dtype."""
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, num_groups, -1).float()
    y = ((grouped - mean[..., None].float()) * rstd[..., None].float()).reshape(x.shape)
    affine_shape = (1, channels) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(affine_shape)
    if bias is not None:
        y = y + bias.float().reshape(affine_shape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


@torch.library.custom_op("distripy::group_norm_apply", mutates_args=())
def _group_norm_apply_op(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool,
) -> torch.Tensor:
    return group_norm_apply_triton(x, mean, rstd, weight, bias, num_groups, silu)


@_group_norm_apply_op.register_fake
def _(x, mean, rstd, weight, bias, num_groups, silu):
    return torch.empty_like(x)


@torch.library.custom_op("distripy::group_norm_apply_out", mutates_args=("out",))
def _group_norm_apply_out_op(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool,
    out: torch.Tensor,
) -> None:
    group_norm_apply_triton(x, mean, rstd, weight, bias, num_groups, silu, out=out)


@_group_norm_apply_out_op.register_fake
def _(x, mean, rstd, weight, bias, num_groups, silu, out):
    return None


def group_norm_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool = False,
    out: Optional[torch.Tensor] = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Normalise ``x`` (B, C, *spatial) per (batch, group) with ``mean`` and ``rstd`` (B, G), apply
    the per-channel affine and, if asked, SiLU. Writes into ``out`` when given and returns it.
    ``backend``: ``torch`` (the reference), ``triton`` (the ops ``distripy::group_norm_apply[_out]``)
    or ``auto`` (Triton on CUDA)."""
    expected = (x.shape[0], num_groups)
    for name, value in (("mean", mean), ("rstd", rstd)):
        if tuple(value.shape) != expected:
            raise InputError(f"group_norm_apply: {name} must have shape {expected}, got {tuple(value.shape)}")
    if out is not None and out.shape != x.shape:
        raise InputError(f"group_norm_apply: out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    if use_triton(backend, x, "group_norm_apply"):
        if out is None:
            return torch.ops.distripy.group_norm_apply(x, mean, rstd, weight, bias, num_groups, silu)
        torch.ops.distripy.group_norm_apply_out(x, mean, rstd, weight, bias, num_groups, silu, out)
        return out
    y = group_norm_apply_reference(x, mean, rstd, weight, bias, num_groups, silu)
    return y if out is None else out.copy_(y)


class GroupNormPrologue(NamedTuple):
    """GroupNorm apply (+ SiLU) of a convolution's input: ``silu((x - mean) * rstd * weight + bias)``
    with ``mean``/``rstd`` (B, G) per (batch, group) and ``weight``/``bias`` (C) or ``None``."""

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    num_groups: int
    silu: bool

    def apply(self, x: torch.Tensor, out: Optional[torch.Tensor] = None, backend: str = "torch"):
        """The prologue on its own (e.g. on the boundary rows a band sends to its neighbours)."""
        return group_norm_apply(
            x,
            self.mean,
            self.rstd,
            self.weight,
            self.bias,
            self.num_groups,
            self.silu,
            out=out,
            backend=backend,
        )


def prologue_op_args(prologue: Optional[GroupNormPrologue]) -> tuple:
    """``prologue`` as the flat arguments a ``torch.library`` op takes (mean, rstd, weight, bias,
    num_groups, silu); Nones, 1 and False for no prologue."""
    if prologue is None:
        return None, None, None, None, 1, False
    return tuple(prologue)


def prologue_from_op_args(mean, rstd, weight, bias, num_groups, silu) -> Optional[GroupNormPrologue]:
    """The ``GroupNormPrologue`` of ``prologue_op_args``' arguments (None without a mean)."""
    if mean is None:
        return None
    return GroupNormPrologue(mean, rstd, weight, bias, num_groups, silu)
