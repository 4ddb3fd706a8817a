"""Combining GroupNorm statistics across ranks, and turning them into mean and rstd.

Statistics are ``(B, G, 2)`` fp32 tensors of ``[sum, sum of squares]`` per (batch, group) (see
``group_norm_stats``). Dividing by an element count gives ``E = [E[x], E[x^2]]``. With ``E(all)``
the whole image's, ``E(own)`` this band's, ``t`` this step and ``t-1`` the previous, and ``n`` the
image's element count over the band's (the number of bands, when they are equal):

* sync (``full_sync``, ``sync_gn``, warm-up): ``E_t(all)`` exactly: the sum of every band's sums;
* corrected (``corrected_async_gn``, DistriFusion's corrected asynchronous GroupNorm):
  ``E_t(all) ~ E_{t-1}(all) + (E_t(own) - E_{t-1}(own))``: last step's image moved by this band's
  own change. In sums: ``S_{t-1}(all) + n * (S_t(own) - S_{t-1}(own))`` (``corrected_sums``);
* stale (``stale_gn``): the other bands' statistics from ``t-1``, this band's from ``t``:
  ``S_{t-1}(all) - S_{t-1}(own) + S_t(own)`` (``stale_sums``), the exact statistics of an image
  whose other bands are last step's;
* local (``separate_gn``, ``naive_patch``): ``E_t(own)``.

The corrected estimate extrapolates, so ``E[x^2] - E[x]^2`` can come out at or below zero (this
band's change is not every band's); that group then uses the band's own fresh variance, always a
variance, and keeps the estimated mean (``mean_rstd(fallback_sums=...)``). The stale estimate is
the variance of real values and needs no fallback. Variances are biased (divided by the count),
as ``torch.nn.GroupNorm``'s are; the reference implementation's are unbiased (``N / (N - 1)``).

These functions are the formulas, in plain torch on ``B x G`` numbers, on the device, reading no
value on the host. The patch GroupNorm computes them as one op (``group_norm_mean_rstd``: one
Triton kernel on CUDA, these functions composed as its reference): written out they are some twenty
element-wise launches per layer.
"""

from typing import Optional, Tuple

import torch

from distripy.errors import InputError

__all__ = ["corrected_sums", "mean_rstd", "stale_sums"]


def corrected_sums(
    image_prev: torch.Tensor, own_prev: torch.Tensor, own_now: torch.Tensor, image_per_band: float
) -> torch.Tensor:
    """The paper's corrected estimate of this step's image sums: ``image_prev + image_per_band *
    (own_now - own_prev)``, where ``image_per_band`` is the image's element count over the band's
    (so that the image's *means* move by the band's change of means)."""
    if not image_per_band >= 1:
        raise InputError(f"corrected_sums: image_per_band must be >= 1, got {image_per_band}")
    return torch.add(image_prev, own_now - own_prev, alpha=image_per_band)


def stale_sums(image_prev: torch.Tensor, own_prev: torch.Tensor, own_now: torch.Tensor) -> torch.Tensor:
    """The other bands' sums from last step with this band's from this step:
    ``image_prev - own_prev + own_now``."""
    return image_prev - own_prev + own_now


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
