"""The ControlNet forward wrapper: bands in, this rank's band of the residuals out.

A ControlNet is the UNet's encoder run on the latent plus an embedding of the conditioning image
(pose, edges, depth) at pixel resolution; its outputs are added, one per resolution, to the UNet's
skip connections. Run on every rank over the whole image it would cost each rank a whole
ControlNet per step; here it runs like the UNet, on bands (``PatchUNetForward``'s generations,
agreement and modes): the latent and the conditioning image, which every rank holds whole, are cut
into this rank's band (``PatchContext.cut_band``: their first convolutions read exact halos from
them), and the residuals are *not* gathered: each rank keeps its band of them, which is all its
UNet band needs (``PatchUNetForward`` recognises a band-sized residual and uses it as it is). The
pipeline's arithmetic on them between the two models (conditioning scales, the sum of several
ControlNets, guess mode's zeros for the unconditional half) acts row-wise, so it is the same on a
band.

The band split must be the UNet's. The UNet splits the ranks into two batch halves (CFG) when its
batch is even; the ControlNet sees the same batch, except in guess mode with CFG, where it sees
only the conditional half. So with ``split_batch`` a ControlNet call splits the ranks the same way
when its batch is even (each group computing its batch half) or in guess mode (each group computing
the whole conditional batch on its band; the pipeline's zeros fill the unconditional half).
"""

from typing import Any, Dict

import torch

from distripy.errors import InputError
from distripy.parallel.bands import BandPlan
from distripy.parallel.unet import PatchUNetForward

__all__ = ["PatchControlNetForward"]


class PatchControlNetForward(PatchUNetForward):
    """Replaces ``controlnet.forward``; returns ``(down residuals, mid residual)`` of this rank's
    band (their batch half when the batch is split). Runs eagerly with ``use_cuda_graph``."""

    spatial_arguments = ()
    model_name = "ControlNet"

    def __init__(
        self, controlnet, context, world_comm, patch_comms, levels: int, condition_scale: int
    ) -> None:
        super().__init__(controlnet, context, world_comm, patch_comms, levels)
        # conditioning image rows per latent row (2 ** the conditioning embedding's stride-2 convs)
        self.condition_scale = condition_scale

    def _plan(self, sample: torch.Tensor, arguments: Dict[str, Any]) -> BandPlan:
        world, units = self.world_comm.world_size, self._units(sample)
        if not (world % 2 == 0 and self._split_wanted(sample)):
            return BandPlan(self.world_comm.rank, world, False, units=units)
        even = sample.shape[0] % 2 == 0
        guess = bool(arguments.get("guess_mode"))
        return BandPlan(self.world_comm.rank, world, even or guess, cut_batch=even and not guess, units=units)

    def _input_problem(self, sample, arguments: Dict[str, Any], plan: BandPlan):
        problem = super()._input_problem(sample, arguments, plan)
        if problem is not None:
            return problem
        condition = arguments.get("controlnet_cond")
        expected = (sample.shape[2] * self.condition_scale, sample.shape[3] * self.condition_scale)
        if not (
            isinstance(condition, torch.Tensor) and condition.dim() == 4 and condition.shape[2:] == expected
        ):
            shape = (
                tuple(condition.shape) if isinstance(condition, torch.Tensor) else type(condition).__name__
            )
            return InputError, (
                f"controlnet_cond of shape {shape} does not match the latent {tuple(sample.shape)}: "
                f"the conditioning image must be {expected[0]} x {expected[1]} "
                f"({self.condition_scale} pixels per latent row)"
            )
        return None

    def _forward_band(self, local: Dict[str, Any]):
        local = dict(
            local,
            sample=self.context.cut_band(local["sample"]),
            controlnet_cond=self.context.cut_band(local["controlnet_cond"]),
        )
        return self.original_forward(**local, return_dict=False)

    def _assemble(self, band, plan: BandPlan):
        return band  # each rank's UNet needs its band only

    def _output(self, residuals, return_dict: bool):
        down, mid = residuals
        if not return_dict:
            return (down, mid)
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
