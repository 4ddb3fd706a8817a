"""``PatchGroupNorm``: GroupNorm of one band with (an estimate of) the whole image's statistics.

The band's sums and sums of squares per (batch, group) are combined across the ranks of its
image as the step asks (``PatchContext.statistics_exchange``; the formulas are in
``kernels.group_norm_combine``): all-reduced and waited for (sync); last step's image statistics
moved by this band's own change since (corrected, DistriFusion's); the other bands' from last step
with this band's from this step (stale); or the band's own (local: ``separate_gn`` after the
warm-up, ``naive_patch``). In the corrected and stale cases this step's sums are all-reduced in the
background for the next step.

Kernels per layer (Triton backend): the band's partial sums per spatial chunk
(``group_norm_partial_stats``), then one op that adds the chunks and, besides, writes the band's
sums into the buffers the exchange keeps (the one the all-reduce works in, the one kept for the
next step's correction): in an asynchronous step ``group_norm_mean_rstd`` with ``sums_out``; in a
synchronous step ``group_norm_sum_partials``, the all-reduce in place, then ``group_norm_mean_rstd``
of the image's sums. No separate copy into the kept buffers, with or without ``static_buffers``.

``prologue(x)`` stops before the normalisation and returns it as a ``GroupNormPrologue`` for the
convolution that follows (the fused ResNet block path, ``parallel.resnet``).
"""

from typing import Tuple

import torch
import torch.nn as nn

from distripy.kernels import (
    Combine,
    GroupNormPrologue,
    elements_per_group,
    group_norm_mean_rstd,
    group_norm_partial_stats,
    group_norm_sum_partials,
)
from distripy.parallel.adopt import adopt
from distripy.parallel.context import PatchContext, PatchState, StatisticsExchange

__all__ = ["PatchGroupNorm"]


class PatchGroupNorm(nn.GroupNorm, PatchState):
    """``nn.GroupNorm`` over this rank's band; shares the original's affine parameters."""

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, context: PatchContext, path: str) -> "PatchGroupNorm":
        module = adopt(cls, norm)
        # Its exchange: the image's sums an all-reduce produces, and the band's sums that went in.
        module.attach(context, path)
        return module

    def statistics(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """This step's mean and rstd (B, G) of the whole image for the band ``x``, exchanging the
        band's sums as the step asks (see the module docstring)."""
        ctx = self.patch_context
        ctx.enter(self, self.patch_path)
        groups = self.num_groups
        backend = ctx.kernel_backend
        partials = group_norm_partial_stats(x, groups, backend=backend)  # (B, G, chunks, 2)
        count = elements_per_group(x, groups)
        total = ctx.image_size(count)  # bands may differ by a row: weighted by their size
        exchange = ctx.statistics_exchange
        if exchange is StatisticsExchange.LOCAL:
            return group_norm_mean_rstd(partials, count=count, eps=self.eps, backend=backend)
        if exchange is StatisticsExchange.SYNC:
            image, local = self._kept_sums(partials)
            group_norm_sum_partials(partials, sums_out=(image, local), backend=backend)
            work = ctx.comm.all_reduce(image)
            work.wait()
            if ctx.keeps_statistics:  # for a corrected or stale step to come
                self.keep_exchange((work,), image, local)
            return group_norm_mean_rstd(image, count=total, eps=self.eps, backend=backend)
        image_prev, local_prev = self.take_stale()
        if exchange is StatisticsExchange.CORRECTED:
            combine = Combine.CORRECTED  # an extrapolated variance can come out negative: fallback
        elif exchange is StatisticsExchange.STALE:
            combine = Combine.STALE
        else:
            raise AssertionError(f"unhandled statistics exchange {exchange!r}")
        image, local = self._kept_sums(partials)
        mean, rstd = group_norm_mean_rstd(
            partials,
            image_prev,
            local_prev,
            combine,
            count,
            total / count,
            self.eps,
            backend=backend,
            sums_out=(image, local),
        )

        def issue() -> None:
            self.keep_exchange((ctx.comm.all_reduce(image),), image, local)

        ctx.defer(issue)
        return mean, rstd

    def _kept_sums(self, partials: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The buffers this step's exchange keeps, ``(B, G, 2)`` each: ``image``, all-reduced in
        place into the image's sums, and ``local``, the band's own sums. The op that adds the band's
        partial sums writes both (no copy); under ``static_buffers`` they are this step parity's
        persistent ones.

        Both are halves of one buffer: under torch.compile (inductor) two fresh tensors given the
        same values can come back as one tensor (identical outputs are merged), and the all-reduce
        of ``image`` would then change ``local`` too; two halves of one buffer cannot be merged."""
        shape = (2, partials.shape[0], partials.shape[1], 2)
        sums = self.patch_context.new_buffer(self, "sums", shape, partials)
        return sums[0], sums[1]

    def prologue(self, x: torch.Tensor, silu: bool) -> GroupNormPrologue:
        """This step's normalisation of ``x`` (+ SiLU), to be applied by the next convolution."""
        mean, rstd = self.statistics(x)
        weight, bias = self.current_weights()
        return GroupNormPrologue(mean, rstd, weight, bias, self.num_groups, silu)

    def current_weights(self):
        """``(weight, bias)`` of the affine step: the layer's own; a subclass whose weights live
        elsewhere (cast or patched on the fly by the host program) gives them here."""
        return self.weight, self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.patch_context.has_neighbours:
            return super().forward(x)
        return self.prologue(x, silu=False).apply(x, backend=self.patch_context.kernel_backend)
