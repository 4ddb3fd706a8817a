"""GroupNorm statistics of one band: per (batch, group) sum and sum of squares, in fp32.

A patch GroupNorm cannot normalise a band with the band's own statistics (that is the
``naive_patch`` seam); it needs the whole image's. Sums (not means) are what ranks exchange,
because sums of equal-sized bands add up to the image's and can be corrected term by term
(``kernels.group_norm_combine``).
"""

import torch

__all__ = ["elements_per_group", "group_norm_stats", "group_norm_stats_reference"]


def group_norm_stats_reference(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Plain-torch statistics: ``(B, G, 2)`` fp32 holding ``[sum, sum of squares]`` of each
    (batch, group) over the group's channels and every spatial position of ``x`` (B, C, *spatial)."""
    batch = x.shape[0]
    grouped = x.reshape(batch, num_groups, -1).float()
    return torch.stack((grouped.sum(dim=-1), grouped.square().sum(dim=-1)), dim=-1)


def group_norm_stats(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(B, G, 2)`` fp32 ``[sum, sum of squares]`` of ``x`` (B, C, *spatial) per (batch, group)."""
    if x.dim() < 2:
        raise ValueError(f"group_norm_stats: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    if x.shape[1] % num_groups != 0:
        raise ValueError(
            f"group_norm_stats: {x.shape[1]} channels do not split into num_groups={num_groups} groups"
        )
    return group_norm_stats_reference(x, num_groups)


def elements_per_group(x: torch.Tensor, num_groups: int) -> int:
    """How many elements of ``x`` each (batch, group) statistic sums over."""
    return x[0].numel() // num_groups
