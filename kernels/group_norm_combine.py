"""Combining GroupNorm statistics across ranks, and turning them into mean and rstd.

Statistics are ``(B, G, 2)`` fp32 tensors of ``[sum, sum of squares]`` (see
``group_norm_stats``). The modes (docs/architecture.md) combine them as follows:

* sync: the image's sums are the all-reduced sum of every band's sums;
* corrected async: ``global_t ~ global_{t-1} - local_{t-1} + local_t``: last step's image sums
  with this band's stale share replaced by its fresh one (DistriFusion's correction);
* stale: last step's image sums as they are.

A corrected estimate can have ``E[x^2] - E[x]^2 <= 0`` when this band's activations shrank
sharply between steps; that group then uses the band's fresh variance instead, which is always a
variance. The work is a handful of element-wise operations on ``B x G`` numbers, so it stays in
torch on every device; the tensors stay on the device and no value is read on the host.
"""

from typing import Optional, Tuple

import torch

from distripy.errors import InputError

__all__ = ["corrected_sums", "mean_rstd"]


def corrected_sums(
    global_prev: torch.Tensor, local_prev: torch.Tensor, local_now: torch.Tensor
) -> torch.Tensor:
    """The corrected estimate of this step's image sums: ``global_prev - local_prev + local_now``."""
    return global_prev - local_prev + local_now


def _mean_var(sums: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    mean = sums[..., 0] / count
    return mean, sums[..., 1] / count - mean * mean


def mean_rstd(
    sums: torch.Tensor,
    count: int,
    eps: float,
    fallback_sums: Optional[torch.Tensor] = None,
    fallback_count: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``1 / sqrt(var + eps)`` per (batch, group) from sums over ``count`` elements.

    With ``fallback_sums`` (the band's fresh sums over ``fallback_count`` elements), a group whose
    variance from ``sums`` is not positive takes the fallback's variance; its mean is kept.
    """
    if count <= 0:
        raise InputError(f"mean_rstd: count must be positive, got {count}")
    mean, var = _mean_var(sums, count)
    if fallback_sums is not None:
        if fallback_count is None or fallback_count <= 0:
            raise InputError(f"mean_rstd: fallback_count must be positive, got {fallback_count}")
        _, fallback_var = _mean_var(fallback_sums, fallback_count)
        var = torch.where(var > 0, var, fallback_var)
    # Rounding can leave E[x^2] - E[x]^2 a hair below zero for a (near) constant group.
    return mean, torch.rsqrt(var.clamp_min(0) + eps)
