"""``PatchGroupNorm``: GroupNorm of one band with the whole image's statistics.

The band's sums and sums of squares per (batch, group) are combined across the ranks of its
image according to the step (see ``PatchContext.statistics_exchange`` and
``kernels.group_norm_combine``): all-reduced and waited for (sync), last step's all-reduced sums
corrected with this step's local ones (corrected), last step's as they are (stale), or the band's
own (local, ``naive_patch``). In the asynchronous cases this step's sums are all-reduced in the
background for the next step.
"""

import torch
import torch.nn as nn

from distripy.kernels import corrected_sums, elements_per_group, group_norm_apply, group_norm_stats, mean_rstd
from distripy.parallel.adopt import adopt
from distripy.parallel.context import PatchContext, PatchState

__all__ = ["PatchGroupNorm"]


class PatchGroupNorm(nn.GroupNorm, PatchState):
    """``nn.GroupNorm`` over this rank's band; shares the original's affine parameters."""

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, context: PatchContext, path: str) -> "PatchGroupNorm":
        module = adopt(cls, norm)
        # _stale: ((all-reduce,), the image's sums it produces, the band's sums that went into it)
        module.attach(context, path)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.patch_context
        if not ctx.has_neighbours:
            return super().forward(x)
        ctx.enter(self, self.patch_path)
        groups = self.num_groups
        backend = ctx.kernel_backend
        local = group_norm_stats(x, groups, backend=backend)
        count = elements_per_group(x, groups)
        total = count * ctx.band_count  # every band has the same number of elements
        exchange = ctx.statistics_exchange
        if exchange == "local":
            mean, rstd = mean_rstd(local, count, self.eps)
        elif exchange == "sync":
            image = local.clone()
            ctx.comm.all_reduce(image).wait()
            self._stale = ((), image, local)
            mean, rstd = mean_rstd(image, total, self.eps)
        else:
            image_prev, local_prev = self.take_stale()
            estimate = (
                corrected_sums(image_prev, local_prev, local) if exchange == "corrected" else image_prev
            )
            mean, rstd = mean_rstd(estimate, total, self.eps, fallback_sums=local, fallback_count=count)
            image = local.clone()

            def issue() -> None:
                self._stale = ((ctx.comm.all_reduce(image),), image, local)

            ctx.defer(issue)
        return group_norm_apply(x, mean, rstd, self.weight, self.bias, groups, backend=backend)
