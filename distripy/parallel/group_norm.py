"""``PatchGroupNorm``: GroupNorm of one band with the whole image's statistics.

The band's sums and sums of squares per (batch, group) are combined across the ranks of its
image according to the step (see ``PatchContext.statistics_exchange`` and
``kernels.group_norm_combine``): all-reduced and waited for (sync), last step's all-reduced sums
corrected with this step's local ones (corrected), last step's as they are (stale), or the band's
own (local, ``naive_patch``). In the asynchronous cases this step's sums are all-reduced in the
background for the next step.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn

from distripy.kernels import corrected_sums, elements_per_group, group_norm_apply, group_norm_stats, mean_rstd
from distripy.parallel.adopt import adopt
from distripy.parallel.context import PatchContext, PatchState
from distripy.runtime.comm import CompletedWork

__all__ = ["PatchGroupNorm"]


class PatchGroupNorm(nn.GroupNorm, PatchState):
    """``nn.GroupNorm`` over this rank's band; shares the original's affine parameters."""

    patch_context: PatchContext
    patch_path: str

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, context: PatchContext, path: str) -> "PatchGroupNorm":
        module = adopt(cls, norm)
        module.patch_context = context
        module.patch_path = path
        # (work of the all-reduce, image sums it produces, the band's sums that went into it)
        module._stale: Optional[Tuple] = None
        context.register(module)
        return module

    def reset_state(self) -> None:
        self._stale = None

    def in_flight(self):
        return () if self._stale is None else (self._stale[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.patch_context
        if not ctx.has_neighbours:
            return super().forward(x)
        ctx.enter(self, self.patch_path)
        groups = self.num_groups
        local = group_norm_stats(x, groups)
        count = elements_per_group(x, groups)
        total = count * ctx.band_count  # every band has the same number of elements
        exchange = ctx.statistics_exchange
        if exchange == "local":
            mean, rstd = mean_rstd(local, count, self.eps)
        elif exchange == "sync":
            image = local.clone()
            ctx.comm.all_reduce(image).wait()
            self._stale = (CompletedWork(), image, local)
            mean, rstd = mean_rstd(image, total, self.eps)
        else:
            if self._stale is None:
                raise ctx.stale_unavailable(self.patch_path)
            work, image_prev, local_prev = self._stale
            work.wait()
            estimate = (
                corrected_sums(image_prev, local_prev, local) if exchange == "corrected" else image_prev
            )
            mean, rstd = mean_rstd(estimate, total, self.eps, fallback_sums=local, fallback_count=count)
            image = local.clone()

            def issue() -> None:
                self._stale = (ctx.comm.all_reduce(image), image, local)

            ctx.defer(issue)
        return group_norm_apply(x, mean, rstd, self.weight, self.bias, groups)
