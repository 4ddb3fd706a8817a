"""GroupNorm apply: normalise with given per-(batch, group) mean and rstd, affine, optional SiLU.

Separate from the statistics because in a patch GroupNorm the mean and rstd come from the whole
image (combined across ranks), not from the band being normalised. ``out`` lets the result land
in a view, e.g. the interior rows of a buffer whose halo rows are received from neighbours.
"""

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["group_norm_apply", "group_norm_apply_reference"]


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


def group_norm_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    silu: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Normalise ``x`` (B, C, *spatial) per (batch, group) with ``mean`` and ``rstd`` (B, G), apply
    the per-channel affine and, if asked, SiLU. Writes into ``out`` when given and returns it."""
    expected = (x.shape[0], num_groups)
    for name, value in (("mean", mean), ("rstd", rstd)):
        if tuple(value.shape) != expected:
            raise ValueError(f"group_norm_apply: {name} must have shape {expected}, got {tuple(value.shape)}")
    y = group_norm_apply_reference(x, mean, rstd, weight, bias, num_groups, silu)
    if out is None:
        return y
    if out.shape != x.shape:
        raise ValueError(f"group_norm_apply: out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
    return out.copy_(y)
